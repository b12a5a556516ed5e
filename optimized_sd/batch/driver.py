"""The batch driver: plans one work item per image (seed fixed by the job, whoever renders it), hands
them to a worker pool, retries items whose worker died, and writes results in plan order, so the files
and their names equal a serial run's, then records each in the manifest."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Protocol

from optimized_sd.batch.jobs import BatchJob
from optimized_sd.batch.manifest import Manifest, ManifestRecord, interrupts_deferred
from optimized_sd.batch.worker import BatchWorker, LoadSpec, RenderedImage, RenderFailure
from optimized_sd.errors import UserError
from optimized_sd.pipelines.output import check_output_folder, make_folder, prompt_folder, save_image_bytes

MAX_ATTEMPTS = 3  # a first try and two retries on other workers


@dataclass
class WorkItem:
    position: int  # order of writing
    job: BatchJob
    index: int
    seed: int
    base_seed: int
    attempts: int = 0


class WorkerLost(Exception):
    """The worker running an item died (process killed, node lost); the item may run elsewhere."""


Outcome = RenderedImage | RenderFailure | WorkerLost


class WorkerPool(Protocol):
    def start(self) -> object:
        """Load the model in every worker (called only when there is work)."""

    def free_slots(self) -> int:
        """How many more items may be submitted now."""

    def in_flight(self) -> int: ...

    def submit(self, item: WorkItem) -> None: ...

    def wait(self) -> list[tuple[WorkItem, Outcome]]:
        """Block until at least one submitted item finishes."""

    def close(self) -> None: ...


class LocalPool:
    """One worker in this process: items run one after another, in order. A caller that keeps a loaded
    `worker` across batches passes it in; the pool then leaves it open."""

    def __init__(self, spec: LoadSpec, worker: BatchWorker | None = None) -> None:
        self.worker = worker if worker is not None else BatchWorker(spec)
        self.owns_worker = worker is None
        self.queued: deque[WorkItem] = deque()

    def start(self) -> None:
        self.worker.load()

    def free_slots(self) -> int:
        return 0 if self.queued else 1

    def in_flight(self) -> int:
        return len(self.queued)

    def submit(self, item: WorkItem) -> None:
        self.queued.append(item)

    def wait(self) -> list[tuple[WorkItem, Outcome]]:
        item = self.queued.popleft()
        return [(item, self.worker.render(item.job.job, item.seed))]

    def close(self) -> None:
        if self.owns_worker:
            self.worker.close()


@dataclass(frozen=True)
class BatchProgress:
    """Told to the progress callback after each image is settled (written or failed)."""

    settled: int
    total: int
    record: ManifestRecord | None  # None for a failure


@dataclass
class BatchReport:
    written: list[ManifestRecord] = field(default_factory=list)
    skipped: int = 0  # already in the manifest
    failures: list[tuple[int, int | None, str]] = field(default_factory=list)  # (line, image index or None: whole job, reason)


def unusable_inputs(job: BatchJob) -> str | None:
    """Why a line's init image or mask cannot be used (missing, a FIFO or a device, not a readable image,
    an all-black mask), found once per line before any of its images is planned."""
    if job.job.init_image is None:
        return None
    try:
        job.job.open_init_image()
    except UserError as error:
        return str(error)
    return None


def plan(jobs: list[BatchJob], manifest: Manifest, report: BatchReport) -> tuple[Iterator[WorkItem], int]:
    """Items for the images the manifest does not hold yet, made one at a time as the pool takes them
    (a line may ask for thousands), and how many there will be; jobs that cannot run go to the report."""
    done: dict[str, dict[int, ManifestRecord]] = {}
    for (key, index), record in manifest.done().items():
        done.setdefault(key, {})[index] = record
    runnable: list[tuple[BatchJob, int, set[int]]] = []  # job, base seed, indices already written
    total = 0
    for job in jobs:
        written = done.get(job.key, {})
        skipped = {index for index in written if index < job.images}
        reason = unusable_inputs(job) if len(skipped) < job.images else None  # a finished line needs no inputs
        if reason is not None:
            report.failures.append((job.line, None, reason))
            continue
        base_seed = job.job.seed
        if base_seed is None:  # random, but the same on resume: taken from the manifest when it has this job
            earlier = next(iter(written.values()), None)
            base_seed = earlier.base_seed if earlier is not None else random.randint(0, 2**32 - 1)
        report.skipped += len(skipped)
        total += job.images - len(skipped)
        runnable.append((job, base_seed, skipped))

    def items() -> Iterator[WorkItem]:
        position = 0
        for job, base_seed, skipped in runnable:
            for index in range(job.images):
                if index not in skipped:
                    yield WorkItem(position, job, index, job.seed_of(base_seed, index), base_seed)
                    position += 1

    return items(), total


def write_image(outdir: Path, item: WorkItem, image: RenderedImage, manifest: Manifest) -> ManifestRecord:
    """The file under its usual name (never replacing one), then its manifest line, Ctrl-C held between."""
    folder = prompt_folder(outdir, item.job.prompt)
    with interrupts_deferred():
        path = save_image_bytes(image.data, folder, item.seed, item.job.job.output.fmt)
        record = ManifestRecord(
            line=item.job.line,
            job=item.job.key,
            index=item.index,
            seed=item.seed,
            base_seed=item.base_seed,
            prompt=item.job.prompt,
            file=path.relative_to(outdir).as_posix(),
            worker=image.worker,
            device=image.device,
            seconds=round(image.seconds, 4),
            peak_vram_mib=round(image.peak_vram_mib, 1),
            peak_rss_mib=round(image.peak_rss_mib, 1),
        )
        manifest.append(record)
    return record


@dataclass
class Schedule:
    """The items between planning and writing: `planned` were submitted and are not yet written (bounded by
    the pool's slots and what waits on an earlier item), `retries` wait for another worker, `settled`
    finished (None: failed) and wait for the items before them to be written."""

    fresh: Iterator[WorkItem]
    planned: dict[int, WorkItem] = field(default_factory=dict)
    retries: deque[WorkItem] = field(default_factory=deque)
    settled: dict[int, RenderedImage | None] = field(default_factory=dict)

    def submit(self, pool: WorkerPool) -> None:
        """Fill the pool's free slots, retries first."""
        while pool.free_slots() > 0:
            item = self.retries.popleft() if self.retries else next(self.fresh, None)
            if item is None:
                break
            self.planned[item.position] = item
            pool.submit(item)

    def abandon(self, report: BatchReport) -> None:
        """No worker is left: every item not yet run fails, so that the writing order goes on."""
        for item in chain(self.retries, self.fresh):
            report.failures.append((item.job.line, item.index, "no worker left to run it"))
            self.planned[item.position], self.settled[item.position] = item, None
        self.retries.clear()

    def collect(self, pool: WorkerPool, report: BatchReport, max_attempts: int) -> None:
        """Settle what the pool finished; an item whose worker died runs again, up to `max_attempts` tries."""
        for item, outcome in pool.wait():
            item.attempts += 1
            if isinstance(outcome, WorkerLost):
                if item.attempts < max_attempts:
                    self.retries.append(item)
                    continue
                report.failures.append((item.job.line, item.index, f"its worker died {item.attempts} times; last: {outcome}"))
                self.settled[item.position] = None
            elif isinstance(outcome, RenderFailure):
                report.failures.append((item.job.line, item.index, outcome.reason))
                self.settled[item.position] = None
            else:
                self.settled[item.position] = outcome

    def next_in_order(self, position: int) -> tuple[WorkItem, RenderedImage | None] | None:
        """The item at `position` and its image once it has settled, else None (an earlier one still runs)."""
        if position not in self.settled:
            return None
        image = self.settled.pop(position)
        return self.planned.pop(position), image


def run_batch(
    jobs: list[BatchJob],
    outdir: Path,
    pool: WorkerPool,
    progress: Callable[[BatchProgress], None] | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> BatchReport:
    """Render every image the manifest in `outdir` lacks and write it; the pool starts (loads the model)
    only when there is work, and is closed at the end. An exception from `progress` (e.g. `errors.Interrupted`) stops the batch:
    what was written stays, with its manifest lines, and a re-run completes the rest."""
    check_output_folder(outdir)
    make_folder(outdir)
    manifest = Manifest(outdir)
    report = BatchReport()
    fresh, total = plan(jobs, manifest, report)
    if total == 0:
        pool.close()
        return report
    schedule = Schedule(fresh)
    next_position = 0
    try:
        pool.start()
        while next_position < total:
            schedule.submit(pool)
            if pool.in_flight() == 0:  # nothing runs and nothing could be submitted: no worker is left
                schedule.abandon(report)
            else:
                schedule.collect(pool, report, max_attempts)
            while (ready := schedule.next_in_order(next_position)) is not None:
                item, image = ready
                record = write_image(outdir, item, image, manifest) if image is not None else None
                if record is not None:
                    report.written.append(record)
                next_position += 1
                if progress is not None:
                    progress(BatchProgress(next_position, total, record))
    finally:
        pool.close()
    return report

"""One job at a time on the device: a FIFO queue served by a single worker thread.

The UI and the API both submit here, so a browser tab and an API client wait in the same line,
each sees its position, and a cancel or interrupt reaches the running job at its next step."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from optimized_sd.errors import Interrupted

log = logging.getLogger("optimized_sd")

WAITING, RUNNING, DONE, FAILED, CANCELLED = "waiting", "running", "done", "failed", "cancelled"


class JobCancelled(Exception):
    """The job was cancelled while it waited: it never ran."""


@dataclass
class StepProgress:
    """Where the running job is: sampler step of the current batch, and the batch among the job's."""

    step: int = 0
    total: int = 0
    batch: int = 0
    batches: int = 1
    latents: Tensor | None = None  # the newest preview source (first image only), on the CPU
    latents_step: int = -1  # the step `latents` belongs to, so a reader knows when it changed

    @property
    def fraction(self) -> float:
        """Share of the whole job done, in [0, 1]."""
        if self.batches <= 0:
            return 0.0
        within = self.step / self.total if self.total else 0.0
        return min(1.0, (self.batch + within) / self.batches)


class Job:
    """A unit of work for the device and its live state, shared by the worker and the front ends."""

    def __init__(self, job_id: int, kind: str, work: Callable[[Job], Any], preview_every: int) -> None:
        self.id = job_id
        self.kind = kind
        self.work = work
        self.preview_every = max(1, preview_every)
        self.state = WAITING
        self.result: Any = None
        self.error: BaseException | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.progress = StepProgress()
        self.cancel_requested = threading.Event()
        self.done = threading.Event()
        self._lock = threading.Lock()

    # -- called from the worker thread (through the pipeline's progress callback) ------------------
    def begin_batch(self, batch: int, batches: int) -> None:
        with self._lock:
            self.progress.batch, self.progress.batches = batch, batches
            self.progress.step = 0

    def report(self, step: int, total: int, latents: Tensor | None = None) -> None:
        """Record a sampler step; raises `Interrupted` once a cancel was asked for, so the
        pipeline stops at this step and releases the stage's memory."""
        with self._lock:
            self.progress.step, self.progress.total = step, total
            if latents is not None and (step % self.preview_every == 0 or step == total):
                self.progress.latents = latents[:1].detach().float().cpu().clone()  # (1, 4, h, w)
                self.progress.latents_step = step
        if self.cancel_requested.is_set():
            raise Interrupted(f"job {self.id} cancelled at step {step} of {total}")

    # -- read from any thread ------------------------------------------------------------------
    def snapshot(self) -> StepProgress:
        with self._lock:
            p = self.progress
            return StepProgress(p.step, p.total, p.batch, p.batches, p.latents, p.latents_step)

    def wait(self, timeout: float | None = None) -> Any:
        """The job's result once it has run; re-raises its error; JobCancelled if it never ran."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"job {self.id} still {self.state} after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


class JobQueue:
    """FIFO of jobs run one at a time by a daemon worker thread (the device is never shared)."""

    def __init__(self, preview_every: int = 2) -> None:
        self.preview_every = preview_every
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="optimized-sd-jobs", daemon=True)
        self._worker.start()

    def submit(self, kind: str, work: Callable[[Job], Any]) -> Job:
        with self._cond:
            if self._closed:
                raise RuntimeError("the job queue is closed")
            job = Job(next(self._ids), kind, work, self.preview_every)
            self._waiting.append(job)
            self._cond.notify_all()
            return job

    def position(self, job: Job) -> int:
        """0 while running, 1.. while waiting (1 = next), -1 once finished or cancelled."""
        with self._cond:
            if job is self._running:
                return 0
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return -1

    @property
    def running(self) -> Job | None:
        return self._running

    def waiting_count(self) -> int:
        with self._cond:
            return len(self._waiting)

    def cancel(self, job: Job) -> None:
        """Drop a waiting job (its waiter gets JobCancelled), or stop a running one at its next step."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, CANCELLED, error=JobCancelled(f"job {job.id} was cancelled before it ran"))
                return
        job.cancel_requested.set()

    def interrupt(self) -> bool:
        """Stop the running job at its next step (AUTOMATIC1111's /interrupt); False when idle."""
        job = self._running
        if job is None:
            return False
        job.cancel_requested.set()
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what waits, stop the running job, and end the worker."""
        with self._cond:
            self._closed = True
            for job in list(self._waiting):
                self._finish(job, CANCELLED, error=JobCancelled(f"job {job.id} was cancelled: the server stopped"))
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel_requested.set()
            self._cond.notify_all()
        self._worker.join(timeout)

    # -- worker ------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
                job.state, job.started = RUNNING, time.time()
            try:
                result = job.work(job)
            except BaseException as error:  # a failed job must never stop the worker
                if not isinstance(error, Exception):
                    log.error("job %d stopped by %s", job.id, type(error).__name__)
                with self._cond:
                    self._running = None
                    self._finish(job, FAILED, error=error)
                continue
            with self._cond:
                self._running = None
                job.result = result
                self._finish(job, DONE)

    @staticmethod
    def _finish(job: Job, state: str, error: BaseException | None = None) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        job.done.set()

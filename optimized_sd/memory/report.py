"""Per-stage measurement: seconds, peak allocated/reserved VRAM (torch.cuda), peak process RSS and, apart, its
anonymous and file-backed shares (Linux) and the page-locked bytes the memory engine holds."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

MIB = 2**20
PROC_STATUS = Path("/proc/self/status")
PEAKS = ("peak_allocated_mib", "peak_reserved_mib", "peak_rss_mib", "peak_rss_anon_mib", "peak_rss_file_mib", "pinned_mib")


def rss_split() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of this process: /proc/self/status' RssAnon and RssFile (Linux; (0, 0)
    elsewhere). Weights read from a memory-mapped file are file-backed (the kernel may drop them); copies are anonymous."""
    try:
        text = PROC_STATUS.read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in text.splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            name, amount, *_ = line.split()
            values[name] = int(amount) * 1024  # kB
    return values.get("RssAnon:", 0), values.get("RssFile:", 0)


@dataclass
class StageRecord:
    """One stage run. `steps` counts UNet calls in the sampling stage (0 elsewhere)."""

    stage: str
    seconds: float
    peak_allocated_mib: float
    peak_reserved_mib: float
    peak_rss_mib: float
    steps: int = 0
    peak_rss_anon_mib: float = 0.0  # of the RSS: anonymous memory (copies, activations, pinned buffers)
    peak_rss_file_mib: float = 0.0  # of the RSS: file-backed pages (memory-mapped weights, libraries)
    pinned_mib: float = 0.0  # page-locked host bytes the memory engine holds (packed copies, ring slots), at the stage's end


class RssSampler:
    """Polls the process' resident set every `interval` seconds on a thread; psutil has no peak
    counter that can be reset per stage, and ru_maxrss only covers the whole process."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self.peak_anon = 0
        self.peak_file = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)
        anon, file = rss_split()
        self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)

    def start(self) -> RssSampler:
        self.peak = self._process.memory_info().rss
        self.peak_anon, self.peak_file = rss_split()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def take_peak(self) -> int:
        """The peak in bytes since `start` or the previous call, which it resets (stage by stage
        measurement where the stages are marked by hooks rather than `with` blocks)."""
        current = self._process.memory_info().rss
        peak, self.peak = max(self.peak, current), current
        return peak

    def take_split_peaks(self) -> tuple[int, int]:
        """The anonymous and file-backed peaks since `start` or the previous call, which it resets."""
        anon, file = rss_split()
        peaks = max(self.peak_anon, anon), max(self.peak_file, file)
        self.peak_anon, self.peak_file = anon, file
        return peaks

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def summarise(records: Iterable[StageRecord], table: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """Per stage name: total seconds and steps, and the highest peaks over its runs (added to `table`)."""
    table = {} if table is None else table
    for record in records:
        row = table.setdefault(record.stage, {"seconds": 0.0, "steps": 0, **dict.fromkeys(PEAKS, 0.0)})
        row["seconds"] += record.seconds
        row["steps"] += record.steps
        for key in PEAKS:
            row[key] = max(row.get(key, 0.0), getattr(record, key))
    return table


class MemoryMeter:
    """Collects a `StageRecord` per stage; cheap enough to stay on for every run. Stages are either
    `with meter.stage(name)` blocks, or boundaries marked from outside with `mark` inside `marked()`
    (hooks on code that has no stages of its own, such as a diffusers pipeline): both measure alike.

    A pipeline may live for days, so nothing here grows per call: `records` holds the current call's
    stages only (`new_call` starts the next), and `totals` folds every call into one row per stage
    name (what a run of several calls reports)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.records: list[StageRecord] = []
        self.totals: dict[str, dict[str, float]] = {}
        self.calls = 0
        self._open_mark: tuple[RssSampler, float] | None = None  # inside `marked`: its sampler, the stage's start
        self.pinned: Callable[[], int] | None = None  # the memory engine's page-locked bytes (set by its session)

    def new_call(self) -> None:
        """Start a call: the previous call's records are dropped (already folded into `totals`)."""
        self.records = []
        self.calls += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _begin(self) -> float:
        """A stage starts now: finish queued device work and reset the device's peak counters."""
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def _end(self, record: StageRecord, started: float, rss_peak: int, split: tuple[int, int]) -> None:
        """Fill in the stage's seconds and peaks (the device work already finished) and keep it."""
        record.seconds = time.perf_counter() - started
        record.peak_rss_mib = rss_peak / MIB
        record.peak_rss_anon_mib, record.peak_rss_file_mib = split[0] / MIB, split[1] / MIB
        record.pinned_mib = (self.pinned() if self.pinned is not None else 0) / MIB
        if self.device.type == "cuda":
            record.peak_allocated_mib = torch.cuda.max_memory_allocated(self.device) / MIB
            record.peak_reserved_mib = torch.cuda.max_memory_reserved(self.device) / MIB
        self.records.append(record)
        summarise([record], self.totals)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        record = StageRecord(name, 0.0, 0.0, 0.0, 0.0)
        started = self._begin()
        with RssSampler() as rss:
            yield record
            self._sync()
        self._end(record, started, rss.peak, (rss.peak_anon, rss.peak_file))

    @contextlib.contextmanager
    def marked(self) -> Iterator[None]:
        """A run whose stage boundaries are marked with `mark`; the first stage starts here."""
        with RssSampler() as rss:
            self._open_mark = (rss, self._begin())
            try:
                yield
            finally:
                self._open_mark = None

    def mark(self, name: str, steps: int = 0) -> StageRecord:
        """End the stage begun at the previous mark (or at `marked`) as `name`, and begin the next."""
        if self._open_mark is None:
            raise RuntimeError("MemoryMeter.mark is called inside `with meter.marked():`")
        rss, started = self._open_mark
        self._sync()
        record = StageRecord(name, 0.0, 0.0, 0.0, 0.0, steps)
        self._end(record, started, rss.take_peak(), rss.take_split_peaks())
        self._open_mark = (rss, self._begin())
        return record

    def summary(self) -> dict[str, dict[str, float]]:
        """The current call's stages: total seconds and steps, and the highest peaks over its runs."""
        return summarise(self.records)

    def format_table(self, table: dict[str, dict[str, float]] | None = None) -> str:
        """One row per stage of `table`: by default every call since the meter was made (`totals`);
        `summary()` gives the last call's."""
        table = self.totals if table is None else table
        width = max([12, *map(len, table)])
        lines = [
            f"{'stage':<{width}} {'seconds':>8} {'s/step':>7} {'alloc MiB':>10} {'reserved MiB':>12} {'RSS MiB':>8} "
            f"{'anon MiB':>9} {'file MiB':>9} {'pinned MiB':>10}"
        ]
        for stage, row in table.items():
            per_step = f"{row['seconds'] / row['steps']:.3f}" if row["steps"] else "-"
            lines.append(
                f"{stage:<{width}} {row['seconds']:>8.2f} {per_step:>7} {row['peak_allocated_mib']:>10.0f} "
                f"{row['peak_reserved_mib']:>12.0f} {row['peak_rss_mib']:>8.0f} {row.get('peak_rss_anon_mib', 0.0):>9.0f} "
                f"{row.get('peak_rss_file_mib', 0.0):>9.0f} {row.get('pinned_mib', 0.0):>10.0f}"
            )
        return "\n".join(lines)

    def as_dict(self, extra: dict | None = None) -> dict:
        """`stages`: every call since the meter was made; `runs`: the last call's stage records."""
        payload = {"device": str(self.device), "calls": self.calls, "stages": self.totals, "runs": [asdict(r) for r in self.records]}
        payload.update(extra or {})
        return payload

    def write_json(self, path: Path, extra: dict | None = None) -> None:
        Path(path).write_text(json.dumps(self.as_dict(extra), indent=2))

"""`batch.jsonl`: one line per finished image, appended only after the image file is complete, so a
re-run with the same output folder knows exactly what is left to do."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from optimized_sd.errors import FieldError

log = logging.getLogger("optimized_sd")
MANIFEST = "batch.jsonl"


@dataclass(frozen=True)
class ManifestRecord:
    line: int  # job file line
    job: str  # BatchJob.key: the record counts only while that line asks for the same thing
    index: int  # image index within the job
    seed: int
    base_seed: int  # the job's first seed (kept so a job with a random seed resumes with the same seeds)
    prompt: str
    file: str  # relative to the output folder
    worker: str
    device: str
    seconds: float
    peak_vram_mib: float
    peak_rss_mib: float


class Manifest:
    def __init__(self, outdir: Path) -> None:
        self.path = outdir / MANIFEST
        self.records: list[ManifestRecord] = []
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        for number, text in enumerate(lines, start=1):
            try:
                self.records.append(ManifestRecord(**json.loads(text)))
            except (json.JSONDecodeError, TypeError) as error:
                if number == len(lines) and not text.endswith("\n"):
                    # a line cut short by a crash while appending: drop it so the next append starts clean
                    log.warning("%s: dropping an unfinished last line", self.path)
                    with open(self.path, "r+b") as handle:
                        handle.truncate(len("".join(lines[:-1]).encode("utf-8")))
                    return
                problem = f"holds {self.path}, whose line {number} is not a batch manifest record ({error}); choose another folder"
                raise FieldError.about("outdir", problem) from None

    def done(self) -> dict[tuple[str, int], ManifestRecord]:
        """(job key, image index) -> record, for images whose file is still there, inside the output folder."""
        return {(r.job, r.index): r for r in self.records if self.holds(r)}

    def holds(self, record: ManifestRecord) -> bool:
        """The record's image is a file under the output folder. A `file` that leads outside it (`..`, an
        absolute path, a symlink out: an edited or foreign manifest) is not done, with a warning: the image
        is made again, and nothing outside the folder is read or replaced."""
        outdir = self.path.parent.resolve()
        try:
            path = (outdir / record.file).resolve()
        except (TypeError, ValueError, OSError):  # not a path at all: a number, a NUL byte, a symlink loop
            path = None
        if path is None or not path.is_relative_to(outdir):
            log.warning("%s: the record of image %s of job line %s names %r, not a file in the output folder; making it again",
                        self.path, record.index, record.line, record.file)
            return False
        return path.is_file()

    def append(self, record: ManifestRecord) -> None:
        """One record as one line; a last line left without its newline (an edited file) is ended first,
        so the new record never joins it."""
        with open(self.path, "a+b") as handle:
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.write((json.dumps(asdict(record)) + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, so an image file and its manifest line are written
    together or not at all. Only the main thread of a POSIX process can do this; elsewhere a no-op."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

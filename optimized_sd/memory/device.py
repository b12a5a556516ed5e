"""Device probing and host-heap tuning, by explicit call only (nothing happens at import)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import torch

from optimized_sd.errors import FieldError, UserError
from optimized_sd.memory.precision import compute_dtype_name


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | None) -> torch.device:
    """'cuda', 'cuda:N', 'cpu', 'mps' or None (the best available) -> a device that exists here."""
    name = name or best_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cuda, cuda:N, cpu or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FieldError.about("device", f"{name}: CUDA is not available on this machine (use the cpu device)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FieldError.about("device", f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise FieldError.about("device", f"{name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UserError(f"unknown device {name!r}; use cuda, cuda:N, cpu or mps")
    return device


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The compute dtype for `--precision` on `device` (the rule: `precision.compute_dtype_name`)."""
    return getattr(torch, compute_dtype_name(device.type, precision))


@dataclass(frozen=True)
class DeviceMemory:
    """Free and total bytes of the compute device (RAM for the CPU)."""

    free: int
    total: int


def device_memory(device: torch.device) -> DeviceMemory:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory(free, total)
    memory = psutil.virtual_memory()
    return DeviceMemory(memory.available, memory.total)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameter numbers (malloc.h)


@dataclass(frozen=True)
class HeapSettings:
    """glibc's two thresholds: allocations over `mmap_threshold` get a mapping of their own (given
    back on free); free memory over `trim_threshold` at the heap's top is given back."""

    mmap_threshold: int
    trim_threshold: int


# Freed blocks stay in the heap for the next allocation of the same size: what glibc's own dynamic
# rule settles on after the first large free (32 MiB, twice that for trimming), fixed from the start.
REUSE_FREED = HeapSettings(32 * 2**20, 64 * 2**20)
# Every allocation over 128 KiB has its own mapping and leaves the resident set when freed.
RETURN_FREED = HeapSettings(128 * 2**10, 128 * 2**10)


class LeanHeap:
    """Heap tuning for the RAM-lean CPU path, one phase per pipeline stage.

    By default glibc keeps freed tensors in the heap, so a streamed model's resident set grows to
    every block's memory it ever touched. Giving every tensor its own mapping fixes that but costs a
    page fault per 4 KiB at each allocation: on SD 1.5 at 512x512, 2-3 s of a 10 s UNet step, whose
    allocations are the same every step. So the sampling stage reuses freed blocks, the one-shot
    stages return them, and every stage ends with the free memory handed back (malloc_trim) and the
    heap left as glibc itself would have it. Process-wide; inert off glibc."""

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        try:
            self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self.libc.mallopt, self.libc.malloc_trim  # noqa: B018 - both must exist (glibc)
        except (OSError, AttributeError):
            self.libc = None

    def apply(self, settings: HeapSettings) -> None:
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, settings.mmap_threshold)
            self.libc.mallopt(M_TRIM_THRESHOLD, settings.trim_threshold)

    @contextlib.contextmanager
    def phase(self, *, repeated: bool) -> Iterator[None]:
        """A stage whose allocations repeat (`repeated`: the sampling loop) or happen once."""
        self.apply(REUSE_FREED if repeated else RETURN_FREED)
        try:
            yield
        finally:
            if self.libc is not None:
                self.libc.malloc_trim(0)
            self.apply(REUSE_FREED)  # between stages and after the run: as glibc would have it

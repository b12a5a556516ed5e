"""Device probing, by explicit call only (nothing happens at import)."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from optimized_sd.errors import UserError


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
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UserError(f"unknown device {name!r}; use cuda, cuda:N, cpu or mps")
    return device


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """`autocast` (default): fp16 on CUDA/MPS, fp32 on CPU (fp16 is not a CPU compute type and bf16
    is about 3x slower on CPUs without AMX); `full`: fp32; `fp16`/`bf16`: as named."""
    choices = {"full": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "autocast":
        return torch.float32 if device.type == "cpu" else torch.float16
    if precision not in choices:
        raise UserError(f"unknown precision {precision!r}; use autocast, full, fp16 or bf16")
    if device.type == "cpu" and choices[precision] is torch.float16:
        raise UserError("fp16 does not run on the CPU; use --precision full (fp32) or bf16")
    return choices[precision]


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


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter numbers (malloc.h)
LEAN_MMAP_THRESHOLD = 128 * 1024


def return_freed_memory_promptly() -> bool:
    """Make glibc serve every allocation over 128 KiB with its own mmap, so a freed tensor goes back
    to the OS at once. By default glibc raises that threshold to the largest block freed so far (up
    to 32 MiB), after which freed tensors stay in the heap and the resident set only grows: a streamed
    model on the CPU then holds every block's memory it ever touched. Process-wide and one-way; a
    no-op (False) off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False

"""The one rule for the compute dtype, torch-free so the benchmark's parent process (which imports no
torch) checks the same names the pipeline and the worker use."""

from __future__ import annotations

from optimized_sd.errors import FieldError, UserError

PRECISIONS = ("autocast", "full", "fp16", "bf16")
NAMED = {"full": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def compute_dtype_name(device_type: str, precision: str) -> str:
    """`autocast` (default): float16 on CUDA/MPS, float32 on the CPU (fp16 is not a CPU compute type and
    bf16 is about 3x slower on CPUs without AMX); `full`: float32; `fp16`/`bf16`: as named. Returns the
    torch dtype's attribute name."""
    if precision == "autocast":
        return "float32" if device_type == "cpu" else "float16"
    if precision not in NAMED:
        raise UserError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if device_type == "cpu" and NAMED[precision] == "float16":
        raise FieldError.about("precision", "fp16 does not run on the CPU; use full (fp32) or bf16")
    return NAMED[precision]

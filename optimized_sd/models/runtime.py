"""Per-call options the model reads at call time, set by whoever runs it (the memory session enters
them from the plan for each stage). The model carries no memory attributes of its own, so one module
tree serves calls with different options, and a thread or task sees only the options it entered."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    """`feed_forward_chunk_tokens`: transformer feed-forwards run over token slices of this size, so
    their 8x-wide hidden activation is never the peak. `unet_micro_batch`: each top-level UNet block
    runs the batch in slices of this size (a streamed block is still loaded once per call). Both give
    the same numbers as the unsliced computation. `int8_matmul`: Linear layers whose weights are stored
    in int8 compute on the CPU with fbgemm's dynamic activation quantisation (`ops.Linear`) instead of
    dequantising to fp32 first: a small extra error (activations rounded to 7 bits), and on the 2-core
    AVX2 machine it was measured on, slower over the whole UNet (so off unless asked for).
    `channels_last`: the UNet runs its activations channels-last, with its convolution weights placed
    so (`OffloadEngine.channels_last`): oneDNN's native layout, the same numbers up to float rounding.
    On the 2-core AVX2 machine the UNet alone took 0.82x the time so (benchmarks/cpu_options.py) but
    whole runs alternating with and without it were no faster (0.98-1.05x), so it is off unless asked for."""

    feed_forward_chunk_tokens: int | None = None
    unet_micro_batch: int | None = None
    int8_matmul: bool = False
    channels_last: bool = False


DEFAULTS = RunOptions()
_current: ContextVar[RunOptions | None] = ContextVar("optimized_sd_run_options", default=None)


def run_options() -> RunOptions:
    """The options in force for the current call (the defaults outside any `use_run_options`)."""
    return _current.get() or DEFAULTS


@contextlib.contextmanager
def use_run_options(options: RunOptions) -> Iterator[RunOptions]:
    """Make `options` the current call's within the block (nested blocks replace, then restore)."""
    token = _current.set(options)
    try:
        yield options
    finally:
        _current.reset(token)

"""Per-call options the model reads at call time, set by whoever runs it (the memory session enters
them from the plan for each stage). The model carries no memory attributes of its own, so one module
tree serves calls with different options, and a thread or task sees only the options it entered."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor


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
    context_projections: ContextProjections | None = field(default=None, compare=False)


class ContextProjections:
    """The keys and values each cross-attention computed from a text context, kept for one sampling stage.
    The context holds the same values at every step, so its projections do too: computing them once is
    exact, and it saves SDXL's 140 small-batch GEMMs per step (2 x 2048 x 1280 weights on 154 tokens in each
    of its 70 transformer blocks) and, in `stream`, reading and casting those weights (13% of the UNet's) at
    every step. Contexts are told apart by value (a copy of each is kept: a caller may reuse its tensor); at
    most `MAX_CONTEXTS` are kept (CFG's pair whole, or a micro-batch's slices), an older one dropped with its
    projections when a new one comes."""

    MAX_CONTEXTS = 4
    SLAB_BYTES = 64 << 20  # the kept projections are copied into slabs this large (see `_keep`); pages never written are never resident

    def __init__(self) -> None:
        self._contexts: list[tuple[int, Tensor]] = []  # (its id, a copy), oldest first
        self._projections: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (owner's id, context's id)
        self._next_id = 0
        self._slab: Tensor | None = None
        self._slab_used = 0

    def _keep(self, tensor: Tensor) -> Tensor:
        """A copy of `tensor` in a slab of its own mapping (over glibc's mmap threshold): kept as they were made,
        SDXL's 140 projections of 0.8 MB each would sit in the heap between a step's freed activations."""
        nbytes = -(-tensor.nbytes // 64) * 64
        if nbytes > self.SLAB_BYTES:
            return tensor.clone()
        if self._slab is None or self._slab.device != tensor.device or self._slab_used + nbytes > self.SLAB_BYTES:
            self._slab, self._slab_used = torch.empty(self.SLAB_BYTES, dtype=torch.uint8, device=tensor.device), 0
        kept = self._slab[self._slab_used : self._slab_used + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        self._slab_used += nbytes
        return kept.copy_(tensor)

    def _context_id(self, context: Tensor) -> int:
        for known, seen in self._contexts:
            if seen.shape == context.shape and seen.dtype == context.dtype and seen.device == context.device and torch.equal(seen, context):
                return known
        if len(self._contexts) == self.MAX_CONTEXTS:
            dropped, _ = self._contexts.pop(0)
            self._projections = {key: value for key, value in self._projections.items() if key[1] != dropped}
        self._next_id += 1
        self._contexts.append((self._next_id, context.clone()))
        return self._next_id

    def get(self, owner: object, context: Tensor, project: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """`project(context)` for this owner and context values, computed at their first meeting."""
        key = (id(owner), self._context_id(context))
        found = self._projections.get(key)
        if found is None:
            keys, values = project(context)
            found = self._projections[key] = (self._keep(keys), self._keep(values))
        return found


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

"""Where one loaded model's weights live, call by call: plan each call, (re)place the weights for
the plan's mode, and run each stage under the engine with the out-of-memory ladder.

The pipeline decides what a call computes; this module decides where it computes it. Neither the
model nor the task modules touch the engine directly."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor, nn

from optimized_sd.attention import use_attention
from optimized_sd.errors import UserError
from optimized_sd.memory.device import LeanHeap, device_memory
from optimized_sd.memory.offload import OffloadEngine
from optimized_sd.memory.planner import SAFETY_MARGIN, Plan, Request, chunks_feed_forward, lower_mode, plan_memory
from optimized_sd.memory.report import MemoryMeter, StageRecord
from optimized_sd.models.layers import FeedForward
from optimized_sd.models.unet import TimestepEmbedSequential
from optimized_sd.pipelines.placement import footprint, group_specs

log = logging.getLogger("optimized_sd")

FEED_FORWARD_CHUNK_TOKENS = 1024
HOST_FOR_DEVICE = {"cuda": "pinned", "cpu": "source", "mps": "cpu"}

Result = TypeVar("Result")


class MemorySession:
    """The memory policy of one pipeline: `prepare` a call, then `run_stage` each of its stages."""

    def __init__(
        self,
        model: nn.Module,
        source,  # optimized_sd.weights.sources.TensorSource
        device: torch.device,
        dtype: torch.dtype,
        *,
        mode: str = "auto",
        budget: int | None = None,
        vae_tiling: str = "auto",
        attention: str = "sdpa",
    ) -> None:
        self.model = model
        self.source = source
        self.device = device
        self.dtype = dtype
        self.requested = mode
        self.budget = budget
        self.vae_tiling = vae_tiling
        self.attention = attention
        self.sizes = footprint(model, dtype.itemsize)  # weight bytes per group: fixed for this pipeline
        plan_memory(self.sizes, Request(64, 64), budget=None, mode=mode, vae_tiling=vae_tiling)  # validates names
        self.meter = MemoryMeter(device)
        self.engine: OffloadEngine | None = None
        self.heap: LeanHeap | None = None
        self.mode: str | None = None
        self.plan: Plan | None = None
        self.last_reason = ""
        self.tensor_hook: Callable[[str, Tensor], None] | None = None  # weight patches (LoRA), in every engine

    def plan_for(self, request: Request) -> Plan:
        budget = self.budget
        measurable = self.device.type == "cuda" or (self.device.type == "cpu" and self.requested == "auto")
        if budget is None and measurable:
            # Weights this pipeline already holds count as available: they would be moved, not added.
            budget = int(device_memory(self.device).free * SAFETY_MARGIN) + self.engine_resident_bytes()
        plan = plan_memory(self.sizes, request, budget=budget, mode=self.requested, vae_tiling=self.vae_tiling)
        if plan.mode != self.requested and self.requested != "auto" and plan.reason != self.last_reason:
            log.warning("%s", plan.reason)
        self.last_reason = plan.reason
        return plan

    def engine_resident_bytes(self) -> int:
        return self.engine.resident_bytes() if self.engine is not None else 0

    def use_mode(self, mode: str) -> None:
        """(Re)place the weights for `mode`; a no-op when already there."""
        if self.engine is not None and self.mode == mode:
            return
        self.release_engine()
        host = HOST_FOR_DEVICE[self.device.type]
        if mode == "full" and self.device.type == "cpu":
            host = "cpu"
        # The RAM-lean path: freed tensors must leave the resident set between stages.
        self.heap = LeanHeap() if mode == "stream" and self.device.type == "cpu" else None
        self.engine = OffloadEngine(
            self.model,
            self.source,
            group_specs(mode, self.model),
            self.device,
            self.dtype,
            host=host,
            prefetch=mode == "stream",
            tensor_hook=self.tensor_hook,
        )
        self.mode = mode
        # With the mode, not the plan: an out-of-memory fallback into stream chunks as well.
        chunk_tokens = FEED_FORWARD_CHUNK_TOKENS if chunks_feed_forward(mode) else None
        for module in self.model.modules():
            if isinstance(module, FeedForward):
                module.chunk_tokens = chunk_tokens

    def set_tensor_hook(self, hook: Callable[[str, Tensor], None] | None) -> None:
        """Patch weights from now on with `hook`; resident weights are placed again through it at once
        (from their host copy or the file, so the previous patch leaves no trace)."""
        self.tensor_hook = hook
        if self.engine is not None:
            self.engine.tensor_hook = hook
            self.engine.reload()

    def prepare(self, request: Request) -> Plan:
        """Plan the call and place the weights for it (a benchmark calls it alone to time loading
        apart from generating)."""
        self.plan = self.plan_for(request)
        self.use_mode(self.plan.mode)
        self.configure_blocks(self.plan, request.unet_batch)
        assert self.engine is not None
        self.engine.events.clear()  # the residency log of this call only: a long-lived pipeline keeps no history
        return self.plan

    def configure_blocks(self, plan: Plan, unet_batch: int | None) -> None:
        """Apply the plan's per-call options: UNet micro-batches, copy-ahead."""
        if self.engine is not None:
            self.engine.lookahead_bytes = plan.lookahead
        for module in self.model.modules():
            if isinstance(module, TimestepEmbedSequential):
                module.micro_batch = unet_batch

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        assert self.engine is not None
        heap = self.heap.phase(repeated=name == "unet") if self.heap is not None else contextlib.nullcontext()
        with use_attention(self.attention), torch.inference_mode(), self.meter.stage(name) as record:
            with heap, self.engine.stage():
                yield record

    def run_stage(self, name: str, work: Callable[[StageRecord], Result]) -> Result:
        """Run a stage; on out-of-memory drop to the next leaner mode (or, in `stream` copying
        ahead, to one block ahead) and retry it once."""
        try:
            with self.stage(name) as record:
                return work(record)
        except torch.OutOfMemoryError:
            if self.engine is not None and self.engine.lookahead_bytes:
                log.warning("out of memory during %s copying blocks ahead; retrying the stage one block ahead", name)
                self.engine.lookahead_bytes = 0
            else:
                lower = lower_mode(self.mode or "stream")
                if lower is None:
                    raise UserError(f"out of memory during {name} even in stream mode; lower --H/--W or --n_samples") from None
                log.warning("out of memory during %s in %s mode; retrying the stage in %s mode", name, self.mode, lower)
                self.use_mode(lower)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            with self.stage(name) as record:
                return work(record)

    def release_engine(self) -> None:
        """Drop the current placement (hooks, device copies, pinned host copies)."""
        if self.engine is None:
            return
        self.engine.close()
        self.engine = None
        self.mode = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

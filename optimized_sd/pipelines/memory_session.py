"""Where one loaded model's weights live, call by call: plan each call, (re)place the weights for
the plan's mode, and run each stage under the engine with the out-of-memory ladder.

The session places named components (`placement.Component`): the model's own text towers, VAE and denoiser
on its tree, side networks (ControlNets) on trees of their own, and whole models planned by sessions of their
own (an SDXL refiner); every stage of every component lands in one report. The pipeline decides what a call
computes; this module decides where it computes it. Neither the model nor the task modules touch the engine
directly."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TypeVar

import torch
from torch import nn

from optimized_sd.attention import use_attention
from optimized_sd.errors import OutOfMemoryBudget, UserError
from optimized_sd.memory.device import LeanHeap, device_memory
from optimized_sd.memory.modes import MODES
from optimized_sd.memory.offload import GroupSpec, OffloadEngine, TensorHook
from optimized_sd.memory.planner import (
    EVERY_STAGE,
    SAFETY_MARGIN,
    STAGES,
    ComponentSize,
    ModelFootprint,
    Plan,
    Request,
    fallback,
    plan_memory,
    resident_component,
)
from optimized_sd.memory.ram import CUDA_PROCESS_OVERHEAD, HOME_ORDER, HostPart, HostPlan, cpu_base, plan_host, ram_refusal
from optimized_sd.memory.report import MemoryMeter, StageRecord
from optimized_sd.models.ops import WeightOp, cpu_int8_matmul_available
from optimized_sd.models.runtime import ContextProjections, RunOptions, use_run_options
from optimized_sd.pipelines.placement import (
    Component,
    context_projections_apart,
    host_part,
    model_components,
    planned_sizes,
    tree_groups,
    units,
)
from optimized_sd.pipelines.weight_storage import StoredSource, WeightStorage, apply_storage

log = logging.getLogger("optimized_sd")

RING_DEVICES = frozenset({"cuda"})  # where the RAM planner offers the pinned ring (a test adds the CPU to check its bytes)
TINY_DECODER = "tiny_decoder"  # the TAESD decoders' weights, placed by the pipeline (`use_tiny_decoders`)
SAMPLING_STAGE = "unet"  # the stage whose allocations repeat step after step (the lean heap reuses them)

Result = TypeVar("Result")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError
    ("DefaultCPUAllocator: can't allocate memory"), which torch raises as a plain RuntimeError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def host_sizes(components: list[ComponentSize]) -> list[tuple[str, int, int, bool]]:
    """(name, weight bytes, largest unit, copied ahead) of each host part that `components` form: those of one
    name together (several ControlNets are one `side`), the ones read once per call first by their first stage
    (`STAGES`'s order), the component copied ahead (the denoiser, read every step) last; none for what stays on
    the device for good."""
    parts: dict[str, tuple[str, int, int, bool]] = {}
    first_stage: dict[str, int] = {}
    for c in components:
        if c.stages == EVERY_STAGE:
            continue
        _, size, unit, ahead = parts.get(c.name, (c.name, 0, 0, False))
        parts[c.name] = (c.name, size + c.weights, max(unit, c.largest_unit), ahead or c.prefetched)
        first_stage.setdefault(c.name, STAGES.index(c.stages[0]) if c.stages[0] in STAGES else len(STAGES))
    return sorted(parts.values(), key=lambda part: (part[3], first_stage[part[0]]))


class MemorySession:
    """The memory policy of one pipeline: `prepare` a call, then `run_stage` each of its stages.
    Every decision comes from the call's `Plan` (built by the pure planner from the mode table); this
    class only carries it out: places the weights for it, enters its per-call model options and heap
    tuning around each stage, and walks the planner's out-of-memory ladder."""

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
        storage: WeightStorage | None = None,
        int8_matmul: bool = False,
        channels_last: bool = False,
        ram_budget: int | None = None,
    ) -> None:
        self.model = model
        self.storage = storage or WeightStorage()
        apply_storage(model, self.storage)
        self.source = StoredSource(source, self.storage) if self.storage.held else source
        self.device = device
        self.dtype = dtype
        # int8 weights on the CPU in fp32, when asked: Linear layers compute with dynamic activation quantisation.
        self.int8_matmul = (
            int8_matmul and self.storage.scaled and self.storage.dtype == torch.int8 and device.type == "cpu"
            and dtype == torch.float32 and cpu_int8_matmul_available()
        )
        # The UNet channels-last on the CPU in fp32, when asked (see `RunOptions`); the VAE (1.12x slower so)
        # stays as it is.
        self.channels_last_on_cpu = channels_last and device.type == "cpu" and dtype == torch.float32
        self.requested = mode
        self.budget = budget
        self.ram_budget = ram_budget  # host bytes (`--ram-budget`; None: every group where its mode puts it)
        self.host_plan: HostPlan | None = None  # the current placement's (`plan_host`)
        self.vae_tiling = vae_tiling
        self.attention = attention
        # The model's own components (denoiser, VAE, text towers) first, on its tree; side networks and neighbouring
        # models join them by `attach`.
        self.components: dict[str, Component] = {c.name: c for c in model_components(model, self.source, dtype.itemsize, self.storage)}
        # What stays on the device for good outside the engines, weighed in every stage (TAESD decoders, `place_for_good`).
        self.resident: dict[str, ComponentSize] = {}
        self.place_for_good(TINY_DECODER, 0)
        plan_memory(self.call_components(), Request(64, 64), budget=None, mode=mode, vae_tiling=vae_tiling)  # validates names
        self.meter = MemoryMeter(device)
        self.meter.pinned = self.pinned_bytes
        self.stage_prefix = ""  # put before each stage's name in the meter (a refiner's: "refiner_")
        self.owns_meter = True  # whether `prepare` starts a new call in the meter (a refiner's joins the base's call)
        self.engine: OffloadEngine | None = None
        self.placed: tuple[str, str] | None = None  # (mode, host storage) the engine was built for
        self.heap: LeanHeap | None = None
        # The sampling stage keeps freed heap blocks for the next step's same-sized tensors (`LeanHeap`); a pipeline
        # whose first step must already stay lean sets False (Flux: its blocks' first loads pin the holes).
        self.reuse_heap_in_sampling = True
        self.plan: Plan | None = None
        self.tensor_hook: TensorHook | None = None
        self.last_reason = ""
        self.parent: MemorySession | None = None  # the session holding this one as a component (a refiner's: its base's)

    @property
    def mode(self) -> str | None:
        return self.placed[0] if self.placed is not None else None

    def as_component(self, name: str) -> Component:
        """This session's model as the component `name` of another session (an SDXL refiner's of its base's)."""
        return Component(name, self.model, self.source, lambda row: [], session=self)

    # -- components, by where they are placed ------------------------------------------------------

    def parts(self) -> list[Component]:
        """The components on the model's own tree, placed by one engine."""
        return [c for c in self.components.values() if c.model is self.model and c.session is None]

    def sides(self) -> list[Component]:
        """The components on trees of their own (ControlNets), each placed by its own engine by this session's plan."""
        return [c for c in self.components.values() if c.model is not self.model and c.session is None]

    @property
    def sessions(self) -> dict[str, MemorySession]:
        """The components planned by sessions of their own (a refiner), by name."""
        return {name: c.session for name, c in self.components.items() if c.session is not None}

    def neighbours(self) -> list[MemorySession]:
        """The other sessions on this device whose weights may still be placed (the parent and its other sessions)."""
        if self.parent is None:
            return list(self.sessions.values())
        return [self.parent, *(s for s in self.parent.sessions.values() if s is not self)]

    def plan_for(self, request: Request) -> Plan:
        """The call's plan. The neighbours' weights (an SDXL base and its refiner) stay placed when this plan
        fits with them still there and is the plan it would be without them, else they are released first
        (never both resident unless they fit)."""
        neighbours = self.neighbours()
        held = sum(session.engine_resident_bytes() for session in neighbours)
        try:
            plan = self.planned(request, self.budget_for(freed=held))
        except OutOfMemoryBudget:
            self.refuse_ram_on_cpu(request)
            raise
        if held:
            try:
                together = self.planned(request, self.budget_for(taken=held))
            except UserError:  # not even the leanest plan fits beside the other's weights
                together = None
            if together is None or (together.mode, together.lookahead) != (plan.mode, plan.lookahead):
                for session in neighbours:
                    session.release_engine()
            else:
                plan = together
        if plan.mode != self.requested and self.requested != "auto" and plan.reason != self.last_reason:
            log.warning("%s", plan.reason)
        self.last_reason = plan.reason
        return plan

    def budget_for(self, *, freed: int = 0, taken: int = 0) -> int | None:
        """Device bytes a call may use: `--vram-budget` less what another pipeline keeps placed (`taken`), or the
        free memory measured now plus this session's own placed weights and another's about to be released
        (`freed`): weights already held count as available, they would be moved, not added. The CPU's
        available RAM bounds every mode, a forced one too: a forced `full` at 20000x20000 would otherwise
        allocate until the machine dies. On CUDA the free memory bounds every mode. On the CPU a budget caps
        the resident set, which also holds what no estimate models (heap fragmentation, the interpreter's
        own growth), so plans keep SAFETY_MARGIN of it, as of measured free memory: SD 1.5 `turbo`, estimated
        at 3.78 GB, took 3.75 GB above the interpreter and passed a 4 GB cap that its estimate met."""
        budget = self.device_budget()
        if budget is not None:
            return int((budget - taken) * SAFETY_MARGIN) if self.device.type == "cpu" else budget - taken
        if self.device.type not in ("cuda", "cpu"):
            return None
        held = self.engine_resident_bytes() + sum(c.weights for c in self.resident.values())  # a TAESD placed at load too
        return int(device_memory(self.device).free * SAFETY_MARGIN) + held + freed

    def device_budget(self) -> int | None:
        """`--vram-budget`; on the CPU, where the device is the host, the lower of it and `--ram-budget`."""
        if self.device.type != "cpu" or self.ram_budget is None:
            return self.budget
        return self.ram_budget if self.budget is None else min(self.budget, self.ram_budget)

    def refuse_ram_on_cpu(self, request: Request) -> None:
        """On the CPU, a device plan refused because of `--ram-budget` is said as a RAM budget: the smallest that fits."""
        if self.device.type != "cpu" or self.ram_budget is None or self.device_budget() != self.ram_budget:
            return
        leanest = MODES[-1]
        estimate = plan_memory(self.call_components(), request, budget=None, mode=leanest, vae_tiling=self.vae_tiling, device_type="cpu")
        raise ram_refusal(self.ram_budget, cpu_base(estimate.estimates[leanest]), f" for {leanest}")

    def host_parts(self, plan: Plan) -> list[HostPart]:
        """The components as the RAM planner sees them under `plan`, the ones read once per call first and the
        denoiser last (it steps down last): none when the mode keeps everything on the device."""
        if plan.row.resident == "everything":
            return []
        default = self.storage.host_for(plan.host)
        usual = {"pinned": ("pinned", "pageable", "mapped"), "cpu": ("pageable", "mapped")}.get(default, ("mapped",))
        # The ring reads units on a thread from the plain file: not for weights quantised as they are read.
        ring = plan.row.denoiser == "blocks" and self.device.type in RING_DEVICES and not self.storage.stored
        streamed = tuple(home for home in HOME_ORDER if home in usual or (ring and home == "ring"))
        parts = host_sizes(self.call_components())
        return [HostPart(name, size, unit, streamed if ahead else usual) for name, size, unit, ahead in parts]

    def plan_host(self, plan: Plan) -> HostPlan | None:
        """Where the weights wait off the device under `--ram-budget` (None without one: as the mode says)."""
        if self.ram_budget is None:
            return None
        base = {"cuda": CUDA_PROCESS_OVERHEAD, "cpu": cpu_base(plan.estimates.get(plan.mode, 0))}.get(self.device.type, 0)
        return plan_host(self.host_parts(plan), self.ram_budget, base=base, what=f" for {plan.mode}")

    def planned(self, request: Request, budget: int | None) -> Plan:
        """The plan for `budget`, without a word logged (plan_for weighs several)."""
        return plan_memory(
            self.call_components(), request, budget=budget, mode=self.requested, vae_tiling=self.vae_tiling, device_type=self.device.type
        )

    def call_components(self) -> list[ComponentSize]:
        """What the planner weighs for a call: the model's components, the side components, what stays for good."""
        return [*planned_sizes(self.parts()), *planned_sizes(self.sides()), *self.resident.values()]

    def place_for_good(self, name: str, weights: int) -> None:
        """Count `weights` bytes that the pipeline keeps on the device for good (a TAESD) in every stage's plan."""
        self.resident[name] = resident_component(name, weights)

    @property
    def sizes(self) -> ModelFootprint:
        """The model's own weights as the SD-shaped view (reports, the bench): fixed for this pipeline."""
        return ModelFootprint.of([*planned_sizes(self.parts()), *self.resident.values()])

    def call_sizes(self) -> ModelFootprint:
        """The view of a call's components, the side components' weights and activations counted in."""
        return ModelFootprint.of(self.call_components())

    def pinned_bytes(self) -> int:
        """Page-locked host bytes this session's engines hold (its own, its components', its sessions'): the report's."""
        engines = [self.engine, *(c.engine for c in self.components.values())]
        own = sum(engine.pinned_bytes() for engine in engines if engine is not None)
        return own + sum(session.pinned_bytes() for session in self.sessions.values())

    def engine_resident_bytes(self) -> int:
        own = self.engine.resident_bytes() if self.engine is not None else 0
        return own + sum(c.engine.resident_bytes() for c in self.sides() if c.engine is not None)

    def attach(self, component: Component) -> None:
        """Place `component` from the next `prepare` on (replacing one of its name): by this session's plan, or,
        when it has a session of its own, by that session's, beside this one; its stages go into this session's
        report as `name_stage`, inside this session's calls."""
        self.detach(component.name)
        self.components[component.name] = component
        session = component.session
        if session is not None:
            session.meter, session.stage_prefix, session.owns_meter, session.parent = self.meter, f"{component.name}_", False, self

    def detach(self, name: str) -> None:
        """Let go of a component and its placement (a component with a session of its own closes it itself)."""
        component = self.components.pop(name, None)
        if component is None:
            return
        if component.session is not None:
            component.session.parent = None
        else:
            component.close()

    def release_component(self, name: str, note: str) -> None:
        """Drop a component's device copies for the rest of the call (a ControlNet whose window ended): its
        engine is closed and built again by the next call's (or an out-of-memory retry's) `place`; `note` goes into
        the report. A no-op when it is not placed."""
        component = self.components[name]
        if component.engine is None:
            return
        component.close()
        component.released.append(note)

    def with_projections_apart(self, model: nn.Module, specs: list[GroupSpec]) -> list[GroupSpec]:
        """Where the sampling stage keeps the context projections, their weights are read only when computed
        (`placement.context_projections_apart`)."""
        return context_projections_apart(model, specs) if self.keeps_context_projections else specs

    def place_components(self, plan: Plan, host: str) -> None:
        """Place each component by `plan`; its streamed units share the model's arena (they never run at once)."""
        assert self.engine is not None
        if self.host_plan is not None:
            host = self.host_plan.host_for("side", host)  # type: ignore[arg-type]
        for component in self.sides():
            if component.engine is None or component.placed != (plan.mode, host):
                component.close()
                specs = self.with_projections_apart(component.model, tree_groups(plan.row, [component.specs(plan.row)]))
                component.engine = OffloadEngine(
                    component.model, component.source, specs, self.device, self.dtype,
                    host=host,  # type: ignore[arg-type]
                    prefetch=plan.prefetch, arena=self.engine.arena,
                )  # fmt: skip
                component.placed = (plan.mode, host)
            component.engine.lookahead_bytes = plan.lookahead

    def place(self, plan: Plan) -> None:
        """(Re)place the weights as the plan's mode and host storage say; a no-op when already so.
        Always adopts the plan's per-call options (copy-ahead, chunking, micro-batch)."""
        host = self.storage.host_for(plan.host)
        host_plan = self.plan_host(plan)
        placing = host if host_plan is None else f"{host} {sorted(host_plan.homes.items())} ring {host_plan.ring_bytes}"
        if self.engine is None or self.placed != (plan.mode, placing):
            self.release_engine()
            parts = self.parts()
            specs = self.with_projections_apart(self.model, tree_groups(plan.row, [part.specs(plan.row) for part in parts]))
            if host_plan is not None:
                specs = [replace(spec, host=host_plan.host_for(host_part(spec.name), host)) for spec in specs]  # type: ignore[arg-type]
            self.host_plan = host_plan
            self.engine = OffloadEngine(
                self.model,
                self.source,
                specs,
                self.device,
                self.dtype,
                host=host,  # type: ignore[arg-type]
                prefetch=plan.prefetch,
                tensor_hook=self.tensor_hook,
                keep_dtype=self.storage.held_set,
                channels_last=(units(self.model).denoiser,) if self.channels_last(plan) else (),
                **({} if host_plan is None or not host_plan.ring_bytes else {"ring_bytes": host_plan.ring_bytes}),
            )
            self.placed = (plan.mode, placing)
            for part in parts:
                part.engine = self.engine
        self.place_components(plan, host)
        # The RAM-lean path: freed tensors must leave the resident set between stages.
        self.heap = LeanHeap() if plan.lean_heap else None
        self.engine.lookahead_bytes = plan.lookahead
        self.plan = plan

    def use_mode(self, mode: str, request: Request | None = None) -> Plan:
        """Place the weights for `mode` as if it were asked for with no budget (tests and tools that
        want a placement without a call)."""
        plan = plan_memory(
            self.call_components(), request or Request(64, 64), budget=None, mode=mode, vae_tiling=self.vae_tiling,
            device_type=self.device.type,
        )  # fmt: skip
        self.place(plan)
        return plan

    def prepare(self, request: Request) -> Plan:
        """Plan the call and place the weights for it (a benchmark calls it alone to time loading
        apart from generating), beside the neighbours as `plan_for` says."""
        self.place(self.plan_for(request))
        assert self.engine is not None and self.plan is not None
        self.engine.events.clear()  # the residency log of this call only: a long-lived pipeline keeps no history
        for component in self.sides():
            component.released.clear()
        if self.owns_meter:
            self.meter.new_call()
        return self.plan

    def set_tensor_hook(self, hook: TensorHook | None) -> None:
        """Patch every weight (see `OffloadEngine.tensor_hook`), from now on. None removes the patch.
        Weights in the compute dtype are patched as they are placed: resident groups are placed again at
        once, the others at their next load. Weights stored otherwise (`--weights`) never reach the hook in
        that form, so their op layers patch the dequantised weight at each call instead (`weight_patch`:
        a LoRA on 8-bit weights costs its low-rank products per call, and no 16-bit copy of the layer)."""
        self.tensor_hook = hook
        for key in self.storage.held:  # "<op layer>.weight"
            layer: WeightOp = self.model.get_submodule(key.removesuffix(".weight"))
            layer.weight_patch = None if hook is None else functools.partial(hook, key)
        if self.engine is not None:
            self.engine.tensor_hook = hook
            self.engine.reload()

    @property
    def keeps_context_projections(self) -> bool:
        """Whether the sampling stage keeps each cross-attention's context projections for its steps
        (`ContextProjections`: exact, and what the CPU's step is bound by), and so whether their weights are read
        only when computed: on the CPU; on CUDA they would hold VRAM a tight plan did not count."""
        return self.device.type == "cpu"

    def run_options(self, stage: str | None = None) -> RunOptions:
        """What the model reads at call time, from the current plan (and, for the sampling stage, where it keeps
        them, a fresh store of context projections)."""
        plan = self.plan
        projections = ContextProjections() if stage == SAMPLING_STAGE and self.keeps_context_projections else None
        if plan is None:
            return RunOptions(int8_matmul=self.int8_matmul, context_projections=projections)
        return RunOptions(
            feed_forward_chunk_tokens=plan.feed_forward_chunk_tokens,
            unet_micro_batch=plan.unet_batch,
            int8_matmul=self.int8_matmul,
            channels_last=self.channels_last(plan),
            context_projections=projections,
        )

    def channels_last(self, plan: Plan) -> bool:
        """Whether the UNet runs channels-last under `plan`: when asked, on the CPU in fp32, and only where
        its weights stay placed for the sampling (`full`, `turbo`). Where they are copied in every step
        (`split`, `stream`), the permuting copy cost what the layout saved: 1.06x `stream`'s step at 512x512."""
        return self.channels_last_on_cpu and not plan.row.streams_denoiser

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        assert self.engine is not None
        repeated = name == SAMPLING_STAGE and self.reuse_heap_in_sampling
        heap = self.heap.phase(repeated=repeated) if self.heap is not None else contextlib.nullcontext()
        with use_attention(self.attention), use_run_options(self.run_options(name)), torch.inference_mode():
            with self.meter.stage(self.stage_prefix + name) as record, heap, self.engine.stage(), self.component_stages():
                yield record

    @contextlib.contextmanager
    def component_stages(self) -> Iterator[None]:
        """Every placed component's stage beside the model's: its `stage_end` groups leave when the stage ends."""
        with contextlib.ExitStack() as stack:
            for component in self.sides():
                if component.engine is not None:
                    stack.enter_context(component.engine.stage())
            yield

    def run_stage(self, name: str, work: Callable[[StageRecord], Result]) -> Result:
        """Run a stage; on out-of-memory take the planner's next rung (`planner.fallback`: one block
        ahead instead of copying further, else the next leaner mode) and retry it once."""
        try:
            with self.stage(name) as record:
                return work(record)
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            assert self.plan is not None
            lower = fallback(self.plan)
            if lower is None:
                raise OutOfMemoryBudget(
                    f"out of memory during {name} even in {self.plan.mode} mode; lower the image size or the batch size"
                ) from None
            if lower.mode == self.plan.mode:
                log.warning("out of memory during %s copying blocks ahead; retrying the stage one block ahead", name)
            else:
                log.warning("out of memory during %s in %s mode; retrying the stage in %s mode", name, self.plan.mode, lower.mode)
            self.place(lower)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                with self.stage(name) as record:
                    return work(record)
            except (torch.OutOfMemoryError, RuntimeError, MemoryError) as again:
                if not is_out_of_memory(again):
                    raise
                raise OutOfMemoryBudget(
                    f"out of memory during {name} again in {lower.mode} mode; lower the image size or the batch size"
                ) from None

    def release_engine(self) -> None:
        """Drop the current placement (hooks, device copies, pinned host copies, arena)."""
        for component in self.sides():
            component.close()
        if self.engine is None:
            return
        self.engine.close()
        self.engine = None
        self.placed = None
        for part in self.parts():
            part.engine = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

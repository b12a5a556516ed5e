"""The memory planner: a pure function from model sizes, a device budget and a request to a plan.

Every estimate is explicit arithmetic over constants documented here, so the planner is testable
without a GPU (fake budgets) and each constant can be re-measured with `benchmarks/calibrate.py`."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from optimized_sd.errors import FieldError, OutOfMemoryBudget, UserError
from optimized_sd.memory.modes import MODE_TABLE, MODES, MemoryMode, denoiser_stage_weights, leaner, mode_row

# Activation elements per unit of work (times the compute dtype's size gives bytes), per family:
# peak allocated minus resident weights in CUDA runs at fp16 with SDPA attention, read by
# `benchmarks/calibrate.py` from the bench's results.json, rounded up so a plan errs towards fitting.


@dataclass(frozen=True)
class UnetActivations:
    """One family's UNet activations: elements per latent pixel per image in the UNet micro-batch, and
    the share left when the feed-forward runs in token chunks (`stream`)."""

    per_latent_pixel: int
    chunked_ff_share: float


@dataclass(frozen=True)
class TokenActivations:
    """A transformer denoiser's activations (DiT families: Flux...), measured per image token: elements per token
    per image in the micro-batch, a token being `patch` x `patch` latent pixels, and the share left in `stream`
    (1.0 where its MLP does not run in token chunks). Read by the planner as per latent pixel, like a UNet's."""

    per_token: int
    chunked_ff_share: float = 1.0
    patch: int = 2

    @property
    def per_latent_pixel(self) -> float:
        return self.per_token / self.patch**2


Activations = UnetActivations | TokenActivations  # a record's measured denoiser constants, in either form


# Each family's measured constants live in its record (`optimized_sd.families`, `unet_activations`) and
# reach the planner in the footprint; one not measured yet (the SDXL refiner) takes these, SD 1.x's, the largest.
DEFAULT_UNET_ACTIVATIONS = UnetActivations(14_000, 0.65)
UNET_ACTIVATION_ELEMENTS_PER_LATENT_PIXEL = DEFAULT_UNET_ACTIVATIONS.per_latent_pixel
UNET_ACTIVATION_CHUNKED_FF = DEFAULT_UNET_ACTIVATIONS.chunked_ff_share


def _measured(record) -> Activations:
    return record.unet_activations or DEFAULT_UNET_ACTIVATIONS


def _registry_view() -> Mapping[str, Activations]:
    """Family id -> its record's constants (a live view of the family registry, imported late: the
    registry's records name this module's types)."""
    from optimized_sd.families.registry import FamilyView

    return FamilyView(_measured, include=lambda record: record.unet_activations is not None)


class _ActivationsTable(Mapping[str, Activations]):
    """`UNET_ACTIVATIONS`: the measured families' constants, read from their records on each lookup."""

    def __getitem__(self, family: str) -> Activations:
        return _registry_view()[family]

    def __iter__(self) -> Iterator[str]:
        return iter(_registry_view())

    def __len__(self) -> int:
        return len(_registry_view())


UNET_ACTIVATIONS: Mapping[str, Activations] = _ActivationsTable()


def unet_activations(family: str | Activations | None) -> Activations:
    """Constants given as they are, or a family id's (from its record); one not measured takes the default."""
    if isinstance(family, (UnetActivations, TokenActivations)):
        return family
    return UNET_ACTIVATIONS.get(family or "", DEFAULT_UNET_ACTIVATIONS)


# With a UNet micro-batch, the images outside the running slice still hold their skip connections
# (every input block's output, kept for the output blocks: 1,940 elements per latent pixel per image
# in SD 1.5, 320-1280 channels at 1/1-1/8 of the latent side) and the running block's input and
# concatenated output at full batch; rounded up.
UNET_FULL_BATCH_ELEMENTS_PER_LATENT_PIXEL = 3_000
MIN_UNET_MICRO_BATCH = 2  # one CFG pair: smaller slices leave a GPU underfilled, and the next mode is usually faster
# The VAE (the same in every family), one image at a time: 791-876 per pixel decoding 512x512 and 768x768,
# 1,281-1,333 at 1024x1024 (H200 2026-11-30), where the mid-block's 16,384-token attention adds its scores.
VAE_DECODE_ELEMENTS_PER_PIXEL = 1_000
VAE_DECODE_LARGE_ELEMENTS_PER_PIXEL = 1_500
VAE_DECODE_LARGE_ABOVE = 768 * 768  # pixels per decode (or per tile) past which the larger figure holds
# A TAESD decoder (64 channels at every level, one image) holds at most three 64-channel maps of the
# output's size at once (a block's input, its conv branch and their sum); rounded up.
TAESD_DECODE_ELEMENTS_PER_PIXEL = 256
VAE_ENCODE_ELEMENTS_PER_PIXEL = 800
VAE_TILE = 512  # pixels; tiled decode works on 64x64-latent tiles with 64-pixel overlap
VAE_TILE_OVERLAP = 64
FIXED_OVERHEAD = 64 * 2**20  # cuBLAS workspace, small buffers, allocator rounding
SAFETY_MARGIN = 0.9  # use at most 90% of the free memory in auto mode


# The stages of one call that the planner weighs, in the order the RAM planner steps components down (read once
# per call first); a component resident in every stage (a TAESD placed for good) names `EVERY_STAGE`.
STAGES = ("text", "encode", "decode", "denoise")
EVERY_STAGE = ("*",)


class StageActivations(NamedTuple):
    """What a component adds to one stage's activations: bytes `running` beside the stage's other running work, a
    `share` of that work's bytes (a side network beside the denoiser), or bytes held `between` the work's calls
    (a preview decode between sampling steps, when the denoiser's activations are freed)."""

    running: int = 0
    share: float = 0.0
    between: int = 0


@dataclass(frozen=True)
class DenoiserActivations:
    """The denoiser's activations: its record's constants (None: looked up by `family`) per latent pixel, with the
    micro-batch and the chunked feed-forward (`unet_activation_bytes`)."""

    family: str = "sd1"
    constants: Activations | None = None
    latent_downscale: int = 8

    @property
    def resolved(self) -> Activations:
        return self.constants if self.constants is not None else unet_activations(self.family)

    def runs(self, request: Request) -> bool:
        return True

    def in_stage(self, stage: str, request: Request, chunked: bool, tiled: bool) -> StageActivations:
        return StageActivations(running=unet_activation_bytes(request, chunked, self.resolved, self.latent_downscale))


@dataclass(frozen=True)
class SideActivations:
    """A side network beside the denoiser (a ControlNet: the UNet's encoder half, ~0.45 of its activations)."""

    share: float

    def runs(self, request: Request) -> bool:
        return True

    def in_stage(self, stage: str, request: Request, chunked: bool, tiled: bool) -> StageActivations:
        return StageActivations(share=self.share)


@dataclass(frozen=True)
class DecodeActivations:
    """The VAE decoder's: not run (weights not placed) when a TAESD decodes instead."""

    def runs(self, request: Request) -> bool:
        return not request.tiny_decode

    def in_stage(self, stage: str, request: Request, chunked: bool, tiled: bool) -> StageActivations:
        return StageActivations(running=decode_activation_bytes(request, tiled) if self.runs(request) else 0)


@dataclass(frozen=True)
class EncodeActivations:
    """The VAE encoder's, when the call encodes an image (img2img, inpainting)."""

    def runs(self, request: Request) -> bool:
        return True

    def in_stage(self, stage: str, request: Request, chunked: bool, tiled: bool) -> StageActivations:
        running = vae_activation_bytes(request, VAE_ENCODE_ELEMENTS_PER_PIXEL, tiled) if request.encodes_image else 0
        return StageActivations(running=running)


@dataclass(frozen=True)
class TinyDecodeActivations:
    """A TAESD decoder's: the decode stage's when it decodes the images, the sampling's between steps for previews."""

    def runs(self, request: Request) -> bool:
        return True

    def in_stage(self, stage: str, request: Request, chunked: bool, tiled: bool) -> StageActivations:
        tiny = TAESD_DECODE_ELEMENTS_PER_PIXEL * request.height * request.width * request.dtype_bytes
        if stage == "decode" and request.tiny_decode:
            return StageActivations(running=tiny)
        return StageActivations(between=tiny) if stage == "denoise" and request.previews else StageActivations()


ActivationModel = DenoiserActivations | SideActivations | DecodeActivations | EncodeActivations | TinyDecodeActivations


@dataclass(frozen=True)
class ComponentSize:
    """One component as the planner sees it: its weight bytes as placed, the stages it is resident in, its streamed
    units in execution order (and its halves) where a mode streams the denoiser's stage, and its activation model.
    A new family's tower or side network is one more of these, no planner field. Where the denoiser's stage
    streams, a `prefetched` component holds its running unit and the next; the others with units (side networks)
    run one after another, one unit at a time between them."""

    name: str
    weights: int
    stages: tuple[str, ...]
    units: tuple[int, ...] = ()
    halves: tuple[int, int] | None = None
    prefetched: bool = False
    activations: ActivationModel | None = None

    @property
    def largest_unit(self) -> int:
        return max(self.units, default=self.weights)

    @property
    def largest_unit_pair(self) -> int:
        """Two consecutive streamed units: the one running and the one being prefetched."""
        units = self.units
        return max((a + b for a, b in zip(units, units[1:] + units[:1])), default=0)

    def resident_in(self, stage: str) -> bool:
        return self.stages == EVERY_STAGE or stage in self.stages

    def runs(self, request: Request) -> bool:
        return self.activations is None or self.activations.runs(request)

    def stage_weights(self, row: MemoryMode) -> int:
        """Bytes on the device while its stage runs in `row` (a mode keeping everything resident: all of them)."""
        if row.resident == "everything":
            return self.weights
        if self.prefetched:
            return denoiser_stage_weights(
                row, total=self.weights, whole=self.weights, largest_half=max(self.halves or (self.weights,)),
                largest_block_pair=self.largest_unit_pair,
            )  # fmt: skip
        return self.largest_unit if row.denoiser == "blocks" and self.units else self.weights

    def in_stage(self, stage: str, request: Request, chunked: bool, tiled: bool) -> StageActivations:
        return StageActivations() if self.activations is None else self.activations.in_stage(stage, request, chunked, tiled)


def resident_component(name: str, weights: int) -> ComponentSize:
    """A TAESD decoder placed on the device for the whole call: in every stage, decoding when asked."""
    return ComponentSize(name, weights, EVERY_STAGE, activations=TinyDecodeActivations())


@dataclass(frozen=True)
class ModelFootprint:
    """An SD-shaped view of a model's components (weight bytes at the compute dtype of each movable part), for
    reports and for tests and benchmarks that describe a model by these figures: `of` derives it from components,
    `components` gives them back. The planner itself reads components only."""

    text_encoder: int
    unet: int
    unet_halves: tuple[int, int]
    unet_blocks: tuple[int, ...]  # in execution order
    vae_encoder: int
    vae_decoder: int
    family: str = "sd1"  # the family's id, for reports
    activations: Activations | None = None  # its record's denoiser constants (None: looked up by `family`)
    latent_downscale: int = 8  # pixels per latent along one axis
    tiny_decoder: int = 0  # a TAESD decoder's weights, on the device for the whole call (fast decode, previews)
    # Side networks running beside the denoiser (ControlNets): their weights whole, their largest streamed unit,
    # and their activations as a share of the denoiser's (a ControlNet is the UNet's encoder half: ~0.45).
    side: int = 0
    side_unit: int = 0
    side_activation_share: float = 0.0

    @property
    def unet_constants(self) -> Activations:
        return self.activations if self.activations is not None else unet_activations(self.family)

    @property
    def denoiser(self) -> int:
        """The denoiser's weights (as the components name it)."""
        return self.unet

    @property
    def total(self) -> int:
        return self.text_encoder + self.unet + self.vae_encoder + self.vae_decoder + self.side

    @property
    def largest_block_pair(self) -> int:
        """Two consecutive streamed blocks: the one running and the one being prefetched."""
        return self.components()[0].largest_unit_pair

    def components(self) -> list[ComponentSize]:
        """These figures as the planner's components: denoiser, VAE halves, text, side networks, TAESD."""
        denoiser = DenoiserActivations(self.family, self.activations, self.latent_downscale)
        parts = [
            ComponentSize("denoiser", self.unet, ("denoise",), self.unet_blocks, self.unet_halves, True, denoiser),
            ComponentSize("vae_encoder", self.vae_encoder, ("encode",), activations=EncodeActivations()),
            ComponentSize("vae_decoder", self.vae_decoder, ("decode",), activations=DecodeActivations()),
            ComponentSize("text_encoder", self.text_encoder, ("text",)),
        ]
        if self.side or self.side_activation_share:
            side = SideActivations(self.side_activation_share)
            parts.append(ComponentSize("side", self.side, ("denoise",), (self.side_unit,), activations=side))
        return [*parts, resident_component("tiny_decoder", self.tiny_decoder)]

    @classmethod
    def of(cls, components: Sequence[ComponentSize]) -> ModelFootprint:
        """The view of `components`, by where each is resident: the prefetched denoiser, the text, encode and decode
        stages' own, side networks beside the denoiser, and what stays for every stage."""
        [denoiser] = [c for c in components if c.prefetched][:1] or [ComponentSize("denoiser", 0, ("denoise",))]
        model = denoiser.activations if isinstance(denoiser.activations, DenoiserActivations) else DenoiserActivations()
        sides = [c for c in components if c.stages == ("denoise",) and not c.prefetched]

        def only(stage: str) -> int:
            return sum(c.weights for c in components if c.stages == (stage,) and c is not denoiser and c not in sides)

        return cls(
            text_encoder=only("text"), unet=denoiser.weights, unet_halves=denoiser.halves or (denoiser.weights, 0),
            unet_blocks=denoiser.units, vae_encoder=only("encode"), vae_decoder=only("decode"), family=model.family,
            activations=model.constants, latent_downscale=model.latent_downscale,
            tiny_decoder=sum(c.weights for c in components if c.stages == EVERY_STAGE),
            side=sum(c.weights for c in sides), side_unit=max((c.largest_unit for c in sides), default=0),
            side_activation_share=sum(getattr(c.activations, "share", 0.0) for c in sides),
        )  # fmt: skip


Model = ModelFootprint | Sequence[ComponentSize]  # the planner's input: components (or the SD-shaped view of them)


def components_of(model: Model) -> Sequence[ComponentSize]:
    return model.components() if isinstance(model, ModelFootprint) else model


@dataclass(frozen=True)
class Request:
    """What one sampling call asks for."""

    height: int
    width: int
    batch: int = 1  # images per call
    guidance: bool = True  # classifier-free guidance doubles the UNet batch
    unet_batch: int | None = None  # micro-batch through the UNet (None: the whole batch)
    dtype_bytes: int = 2
    encodes_image: bool = False  # img2img and inpainting run the VAE encoder
    tiny_decode: bool = False  # a TAESD decodes the images instead of the VAE's decoder
    previews: bool = False  # a TAESD decodes a preview between sampling steps


@dataclass(frozen=True)
class Plan:
    """Every memory decision of one call, so nothing downstream re-derives a rule from the mode's name:
    the mode (its table row is `row`), VAE tiling, how far `stream` copies ahead, where weights wait
    off the device, prefetch, feed-forward chunking, the UNet micro-batch and the heap tuning. Plain
    values only (a report writes it as JSON). `estimates` holds every mode's estimated peak."""

    mode: str
    vae_tiling: bool
    estimates: dict[str, int] = field(default_factory=dict)
    budget: int | None = None
    reason: str = ""
    lookahead: int = 0  # stream: weight bytes it may hold copying blocks ahead (0: current and next)
    device_type: str = "cuda"
    host: str = "pinned"  # HostStorage
    prefetch: bool = False
    feed_forward_chunk_tokens: int | None = None
    unet_batch: int | None = None  # micro-batch inside each top-level UNet block (None: the whole batch)
    lean_heap: bool = False  # glibc tuned per stage (modes.MemoryMode.lean_heap_on_cpu, on the CPU)

    @property
    def row(self) -> MemoryMode:
        return mode_row(self.mode)


def row_options(row: MemoryMode, device_type: str) -> dict:
    """The plan fields a mode's row decides on a `device_type` device."""
    return {
        "mode": row.name,
        "device_type": device_type,
        "host": row.host_for(device_type),
        "prefetch": row.prefetch and device_type == "cuda",
        "feed_forward_chunk_tokens": row.feed_forward_chunk_tokens,
        "lean_heap": row.lean_heap_on_cpu and device_type == "cpu",
    }


def fallback(plan: Plan) -> Plan | None:
    """The out-of-memory ladder, one rung: copying ahead retries one block ahead; any other plan
    retries in the next leaner mode (with that row's chunking, host storage and heap); the leanest
    mode one block ahead has nowhere to go (None)."""
    if plan.lookahead:
        return replace(plan, lookahead=0, reason=f"out of memory in {plan.mode} copying ahead")
    lower = leaner(plan.mode)
    if lower is None:
        return None
    return replace(plan, **row_options(lower, plan.device_type), reason=f"out of memory in {plan.mode}")


def chunks_feed_forward(mode: str) -> bool:
    """Whether `mode` runs the UNet feed-forward in token chunks (its estimates assume it)."""
    return mode_row(mode).feed_forward_chunk_tokens is not None


def cfg_batch(request: Request) -> int:
    """Images per UNet call: classifier-free guidance runs the unconditional and conditional halves together."""
    return request.batch * (2 if request.guidance else 1)


def unet_elements_per_latent_pixel(family: str | Activations | None, chunked: bool) -> float:
    """A family's (or given constants') UNet activation elements per latent pixel per image, with or without the
    chunked feed-forward."""
    constants = unet_activations(family)
    return constants.per_latent_pixel * (constants.chunked_ff_share if chunked else 1.0)


def unet_activation_bytes(request: Request, chunked: bool, family: str | Activations | None = None, downscale: int = 8) -> int:
    """The running micro-batch's activations, plus what the rest of the batch holds meanwhile (`family`: an
    id or the record's constants; `downscale`: pixels per latent)."""
    latent_pixels = (request.height // downscale) * (request.width // downscale)
    whole = cfg_batch(request)
    micro = min(request.unet_batch or whole, whole)
    running = unet_elements_per_latent_pixel(family, chunked) * micro
    waiting = UNET_FULL_BATCH_ELEMENTS_PER_LATENT_PIXEL * (whole - micro)
    return int((running + waiting) * latent_pixels * request.dtype_bytes)


def vae_activation_bytes(request: Request, per_pixel: int, tiled: bool) -> int:
    height, width = (min(request.height, VAE_TILE), min(request.width, VAE_TILE)) if tiled else (request.height, request.width)
    return per_pixel * height * width * request.dtype_bytes


def decode_activation_bytes(request: Request, tiled: bool) -> int:
    """The VAE decode's activations: the larger per-pixel figure once one decode (or tile) passes
    `VAE_DECODE_LARGE_ABOVE` pixels."""
    pixels = min(request.height, VAE_TILE) * min(request.width, VAE_TILE) if tiled else request.height * request.width
    return vae_activation_bytes(request, decode_elements_per_pixel(pixels), tiled)


def decode_elements_per_pixel(pixels: int) -> int:
    """The decode's activation elements per pixel for one decode (or tile) of `pixels` pixels."""
    return VAE_DECODE_LARGE_ELEMENTS_PER_PIXEL if pixels > VAE_DECODE_LARGE_ABOVE else VAE_DECODE_ELEMENTS_PER_PIXEL


def stage_activation_bytes(components: Sequence[ComponentSize], stage: str, request: Request, chunked: bool, tiled: bool) -> int:
    """One stage's activations: its running work's bytes with the shares beside them (side networks), or what is
    held between the work's calls (previews), whichever is larger."""
    parts = [c.in_stage(stage, request, chunked, tiled) for c in components if c.resident_in(stage)]
    running = int(sum(p.running for p in parts) * (1 + sum(p.share for p in parts)))
    return max([running, *(p.between for p in parts)])


def stage_weight_bytes(components: Sequence[ComponentSize], stage: str, row: MemoryMode, request: Request) -> int:
    """Weight bytes on the device while `stage` runs in `row`: each running component's share; the streamed ones
    without prefetch (side networks) run one after another, so the largest of their units."""
    placed = [c for c in components if c.resident_in(stage) and c.runs(request)]
    in_turn = [c for c in placed if c.units and not c.prefetched and row.denoiser == "blocks"]
    return sum(c.stage_weights(row) for c in placed if c not in in_turn) + max((c.largest_unit for c in in_turn), default=0)


def stages_of(components: Sequence[ComponentSize]) -> list[str]:
    """The stages the components are resident in (`STAGES` first, in its order, then any other)."""
    named = {stage for c in components if c.stages != EVERY_STAGE for stage in c.stages}
    return [*(s for s in STAGES if s in named), *sorted(named - set(STAGES))]


def estimate_peak(mode: str, model: Model, request: Request, vae_tiling: bool) -> int:
    """Peak allocated bytes of one run in `mode`: the largest of its stages' resident weights plus
    that stage's activations (everything resident: all the weights plus the largest stage's activations)."""
    components = components_of(model)
    chunked = chunks_feed_forward(mode)
    row = mode_row(mode)
    stages = stages_of(components)
    activations = {stage: stage_activation_bytes(components, stage, request, chunked, vae_tiling) for stage in stages}
    if row.resident == "everything":
        return sum(c.weights for c in components) + max(activations.values(), default=0) + FIXED_OVERHEAD
    return max((stage_weight_bytes(components, s, row, request) + activations[s] for s in stages), default=0) + FIXED_OVERHEAD


def stream_lookahead(model: Model, request: Request, budget: int) -> int:
    """Weight bytes `stream` may keep on the device while copying the prefetched component's (the denoiser's)
    units ahead: what the budget leaves beside its stage's activations, or 0 when that is no more than the running
    unit and the next. Copying further ahead hides the copies of the wide low-resolution blocks (most of
    the bytes, little compute) behind the compute of the high-resolution ones (see
    benchmarks/stream_floor.py)."""
    streamed = [c for c in components_of(model) if c.prefetched]
    if not streamed:
        return 0
    denoiser = streamed[0]
    stream_act = denoiser.in_stage(denoiser.stages[0], request, chunks_feed_forward("stream"), False).running
    room = min(budget - stream_act - FIXED_OVERHEAD, denoiser.weights)
    return room if room > denoiser.largest_unit_pair else 0


def micro_batched(
    mode: str, model: Model, request: Request, budget: int, tiled_for: Callable[[str, Request], bool]
) -> Request | None:
    """`request` with the largest UNet micro-batch (at least `MIN_UNET_MICRO_BATCH`) under which `mode`
    fits `budget`, or None. A micro-batch the user set is theirs: never changed."""
    if request.unet_batch is not None:
        return None
    for size in range(cfg_batch(request) - 1, MIN_UNET_MICRO_BATCH - 1, -1):
        asked = replace(request, unet_batch=size)
        if estimate_peak(mode, model, asked, tiled_for(mode, asked)) <= budget:
            return asked
    return None


def check_plan_options(mode: str, vae_tiling: str) -> None:
    """The memory mode and VAE tiling asked for are ones the planner knows (FieldError naming the option)."""
    if mode != "auto" and mode not in MODES:
        raise UserError(f"unknown memory mode {mode!r}; choose one of auto, {', '.join(MODES)}")
    if vae_tiling not in ("auto", "on", "off"):
        raise FieldError.about("vae_tiling", f"must be auto, on or off, not {vae_tiling!r}")


def plan_memory(
    model: Model,
    request: Request,
    *,
    budget: int | None,
    mode: str = "auto",
    vae_tiling: str = "auto",
    device_type: str = "cuda",
) -> Plan:
    """Pick the fastest mode whose estimate fits `budget` (None: no limit, i.e. `full`), each mode tried
    with the whole batch through the UNet, then with the largest micro-batch that fits (so a batch of
    several images keeps a faster mode on a small card instead of dropping to a leaner one). A forced mode
    is kept (micro-batched if need be), and a forced `stream` keeps to one block ahead (the lowest memory, what it is asked
    for); a prefetching mode picked by `auto` copies further ahead within what the budget leaves. VAE
    tiling `auto` turns on only when the untiled decode would not fit. The returned plan carries the
    chosen row's options for a `device_type` device. `model`: its components (`ComponentSize`), each weighed in
    the stages it is resident in."""
    check_plan_options(mode, vae_tiling)
    model = components_of(model)

    def tiled_for(candidate: str, asked: Request) -> bool:
        if vae_tiling != "auto":
            return vae_tiling == "on"
        if budget is None:
            return False
        return estimate_peak(candidate, model, asked, False) > budget >= estimate_peak(candidate, model, asked, True)

    tiled = {m: tiled_for(m, request) for m in MODES}
    estimates = {m: estimate_peak(m, model, request, tiled[m]) for m in MODES}

    def chosen(candidate: str, reason: str, asked: Request, lookahead: int = 0) -> Plan:
        options = row_options(mode_row(candidate), device_type)
        tiling = tiled_for(candidate, asked)
        return Plan(
            vae_tiling=tiling,
            estimates={**estimates, candidate: estimate_peak(candidate, model, asked, tiling)},
            budget=budget,
            reason=reason,
            lookahead=lookahead,
            unet_batch=asked.unet_batch,
            **options,
        )

    if mode != "auto" and (budget is None or estimates[mode] <= budget):
        return chosen(mode, "as asked", request)
    if budget is None:
        return chosen(MODES[0], "no memory limit", request)
    first = 0 if mode == "auto" else MODES.index(mode)  # a forced mode is kept if a micro-batch fits it
    for row in MODE_TABLE[first:]:
        candidate = row.name
        asked = request if estimates[candidate] <= budget else micro_batched(candidate, model, request, budget, tiled_for)
        if asked is None:
            continue
        reason = "fastest that fits" if mode == "auto" else "as asked"
        if mode not in ("auto", candidate):
            reason = (
                f"{mode} needs about {format_bytes(estimates[mode])} but the budget is "
                f"{format_bytes(budget)}; {candidate} was chosen instead"
            )
        if asked is not request:
            reason += f" with the UNet running {asked.unet_batch} of its {cfg_batch(request)} images at a time"
        lookahead = stream_lookahead(model, asked, budget) if row.prefetch and mode == "auto" else 0
        return chosen(candidate, reason, asked, lookahead)
    leanest = MODES[-1]
    memory = "RAM (available)" if device_type == "cpu" else "VRAM budget"
    fits = largest_fitting_side(model, request, budget, leanest, vae_tiling != "off")
    what_fits = f"{request.batch} image(s) of {fits}x{fits} would fit" if fits else "not even one 64x64 image fits"
    raise OutOfMemoryBudget(
        f"a {memory} of {format_bytes(budget)} is below the smallest plan: "
        f"{leanest} needs about {format_bytes(estimates[leanest])} at {request.width}x{request.height}; {what_fits}"
    )


def largest_fitting_side(model: Model, request: Request, budget: int, mode: str, vae_tiling: bool) -> int:
    """The largest square size (a multiple of 64 pixels, 0 for none) whose estimate in `mode` fits
    `budget`, for an error that says what would fit. Estimates grow with the size, so bisect."""

    def fits(side: int) -> bool:
        return estimate_peak(mode, model, replace(request, height=side, width=side), vae_tiling) <= budget

    low, high = 0, 1024  # in units of 64 pixels: up to 65536x65536
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle * 64):
            low = middle
        else:
            high = middle - 1
    return low * 64


def lower_mode(mode: str) -> str | None:
    """The next leaner mode's name (see `modes.leaner`)."""
    row = leaner(mode)
    return row.name if row is not None else None


SIZE_UNITS = {
    "": 1, "B": 1,
    "K": 2**10, "KB": 2**10, "KIB": 2**10,
    "M": 2**20, "MB": 2**20, "MIB": 2**20,
    "G": 2**30, "GB": 2**30, "GIB": 2**30,
}


def parse_bytes(text: str) -> int:
    """'1.5GB', '800MB', '2G', '1073741824' -> bytes (binary units, as nvidia-smi and torch report)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS:
        raise UserError(f"cannot read the memory size {text!r}; write it like 1.5GB or 800MB")
    amount = float(match.group(1)) * SIZE_UNITS[unit]
    if not amount < MAX_MEMORY_SIZE:  # also catches a number too long for a float (inf)
        raise UserError(f"the memory size {text!r} is beyond any machine's memory (the limit is {MAX_MEMORY_SIZE // 2**50} PB)")
    value = int(amount)
    if value <= 0:
        raise UserError(f"the memory size {text!r} must be above zero")
    return value


MAX_MEMORY_SIZE = 2**60  # bytes: a sanity bound for --vram-budget, far past any device


def format_bytes(value: int) -> str:
    return f"{value / 2**30:.2f} GB" if value >= 2**30 else f"{value / 2**20:.0f} MB"

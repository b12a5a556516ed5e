"""Model families as records: one frozen `FamilyRecord` per family, kept in one registry.

Everything that differs between families (how a file is recognised, how its config is read off its shapes,
its key layouts, latent format, text towers, parameterisation, defaults, planner constants, the units the
memory engine moves, LoRA key tables) is a field of its record; the rest of the code asks the record and never
tests a family by name. A new family is a record (plus its network file and maybe a text-tower file):
`register` it, and `detect`, `by_name` and `record_for` find it. The built-in records (`families.sd`) are
registered on the first lookup, not at import, so low layers may import this module freely."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from optimized_sd.errors import UserError
from optimized_sd.memory.planner import Activations

if TYPE_CHECKING:
    from optimized_sd.config import ModelConfig

Shapes = Mapping[str, tuple[int, ...]]
EPSILON, V_PREDICTION = "epsilon", "v_prediction"


@dataclass(frozen=True)
class LatentFormat:
    """The VAE's latent space: channels, pixels per latent, the scale (and shift) that brings latents to
    unit variance for the denoiser, and the 4x3 latent -> RGB map (plus bias) a live preview uses."""

    channels: int = 4
    downscale: int = 8
    scale_factor: float = 0.18215
    shift: float = 0.0
    rgb_factors: tuple[tuple[float, float, float], ...] = ()  # (channels, 3), latents in model space
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class TextTower:
    """One text tower in run order: its kind (transformers "clip", or "open_clip" with fused q/k/v), its
    key prefix in a single file, its diffusers subfolders, its padding and its name in LoRA tables."""

    kind: str
    prefix: str
    folder: str  # diffusers folder holding its weights ("text_encoder", "text_encoder_2")
    tokenizer: str  # diffusers folder holding its tokenizer
    pad_id: int | None = None  # None: the tokenizer's own pad token (CLIP); OpenCLIP pads with 0
    penultimate: bool = False  # SGM style: context before the last layer, no final norm (SD 2.x's OpenCLIP: False)
    lora_name: str | None = "text"  # the tower LoRA prefixes patch; None: no LoRA format names it


@dataclass(frozen=True)
class LoraKeys:
    """A family's LoRA file conventions: name prefix -> the tower it patches ("unet", "text", "text_2"),
    in kohya's and diffusers' formats, and the widths that give a LoRA of this family away."""

    kohya: Mapping[str, str] = field(default_factory=dict)
    diffusers: Mapping[str, str] = field(default_factory=dict)
    context_width: int | None = None  # the full-size UNet's cross-attention width
    text_width: int | None = None  # the width of a single text tower LoRAs name `lora_te_`/`text_encoder.`
    # The denoiser's LoRA module names when they are not SD's UNet names: its own weight keys and shapes -> name ->
    # `weights.lora.Target`s (several where one LoRA module covers row ranges of a fused weight).
    denoiser_names: Callable[[Shapes], Mapping[str, tuple[Any, ...]]] | None = None
    telltale: str | None = None  # a regex on module names only this family's LoRAs have (names it in errors)
    unsupported: Mapping[str, str] = field(default_factory=dict)  # prefix -> the part it patches, which is refused


@dataclass(frozen=True)
class Units:
    """The module paths the memory engine places and moves: the denoiser (streamed by its own blocks),
    the VAE halves, the text module's root."""

    denoiser: str = "model.diffusion_model"
    vae_encoder: tuple[str, ...] = ("first_stage_model.encoder", "first_stage_model.quant_conv")
    vae_decoder: tuple[str, ...] = ("first_stage_model.post_quant_conv", "first_stage_model.decoder")
    text_root: str = "cond_stage_model"
    # A denoiser that is not a UNet of named blocks: its streamed units (tuples of paths under `denoiser`, each
    # run first module to last) in call order; the first `hoisted` run once per sampling run, not per step
    # (a count, or a function of the denoiser when the count follows its depth).
    denoiser_units: Callable[[Any], list[tuple[str, ...]]] | None = None
    hoisted: int | Callable[[Any], int] = 0

    def hoisted_units(self, denoiser: Any) -> int:
        """How many of `denoiser_units(denoiser)` run once per sampling run."""
        return self.hoisted(denoiser) if callable(self.hoisted) else self.hoisted


@dataclass(frozen=True)
class Defaults:
    """What a run uses when the user says nothing: the image side (eps and v models may differ), steps, sampler."""

    size: int = 512
    v_size: int | None = None  # the side of the family's v-prediction models, when another
    steps: int = 50
    sampler: str = "plms"
    scale: float = 7.5  # classifier-free guidance (1: off, one denoiser pass per step)
    # What an AUTOMATIC1111 request (the API, the web UI) that leaves steps, CFG scale or size out gets: True,
    # AUTOMATIC1111's own (the API's 50 steps, the UI's 20, CFG 7, 512 px: what SD clients expect); False, this
    # record's (a distilled model run at CFG 7 is slow and wrong).
    a1111: bool = True

    def size_for(self, prediction_type: str) -> int:
        return self.v_size if self.v_size is not None and prediction_type == V_PREDICTION else self.size


@dataclass(frozen=True)
class DiffusersLayout:
    """How a diffusers folder states this family's UNet: its `use_linear_projection` and `addition_embed_type`
    (the text towers' folders are the records' `TextTower.folder`)."""

    linear_projection: bool = False
    addition_embed_type: str | None = None


@dataclass(frozen=True)
class Loader:
    """How a family whose files are not one LDM checkpoint opens (Flux: a transformer, a VAE and text towers
    in several files): `claims(path)` says whether a checkpoint path is this family's, `prepare(path, parts,
    vae, **options)` builds its model on `meta` as a `weights.loading.LoadedModel` (`parts`: the `--text-encoder`
    files), and `pipeline` is the `StableDiffusion` subclass that runs
    it. `options`: the load options besides files that `prepare` takes by keyword (Flux.1's `parts_from`, Flux.2 klein's `distilled`);
    `describe(path)`: what `inspect` says of its files (a `weights.inspect.CheckpointInfo`; None: Flux.1's parts
    table)."""

    claims: Callable[[Path], bool]
    prepare: Callable[..., Any]
    pipeline: Callable[..., Any]
    options: tuple[str, ...] = ()
    describe: Callable[[Path], Any] | None = None  # what `inspect` says of its files (None: Flux.1's description)


@dataclass(frozen=True)
class FamilyRecord:
    """Everything one model family decides, in one place (ComfyUI's `supported_models` classes as data)."""

    name: str  # registry key
    display_name: str  # the words users know it by
    detect: Callable[[Shapes], bool]  # do these keys/shapes look like this family (telltales only, cheap)
    infer_config: Callable[[Shapes, FamilyRecord], ModelConfig]  # the model's config read off its shapes
    latent: LatentFormat
    towers: tuple[TextTower, ...]
    family: str = ""  # the id configs, metadata and reports carry ("" = `name`); variants share their base's
    priority: int = 0  # higher is tried first (a variant, or a family whose telltale another's keys also have)
    check: Callable[[Shapes], None] | None = None  # after `detect`: raise what is wrong with a file of this family
    unused_keys: Callable[[Shapes, ModelConfig], dict[str, str]] | None = None  # key prefixes carried, never run -> why
    conditioner: str = "single"  # "single": one tower as `cond_stage_model`; "sgm": `conditioner.embedders.N`, concatenated
    size_vector: Callable[[int, int, bool], tuple[float, ...]] | None = None  # SGM `y` numbers for (h, w, negative)
    zero_empty_negative: bool = False  # an empty negative prompt is all-zero conditioning (SDXL base)
    prediction: str = EPSILON  # what its files predict when they do not say
    v_capable: bool = False  # whether v-prediction files of this family exist (else `--prediction v` warns)
    prediction_hint: Callable[[Path], bool] | None = None  # a file name that says v (SD 2.x "768")
    prediction_hint_reason: str = ""
    defaults: Defaults = field(default_factory=Defaults)
    unet_activations: Activations | None = None  # the planner's measured constants, per latent pixel or per image token (None: its default)
    units: Units = field(default_factory=Units)
    lora: LoraKeys = field(default_factory=LoraKeys)
    diffusers: DiffusersLayout | None = None  # None: no diffusers folder layout
    unet_in_channels: int = 4  # what its UNet's first conv takes (9: an inpainting UNet)
    unet_heads: int | None = 8  # a fixed UNet head count (SD 1.x), or None: one head per 64 channels
    refiner: str | None = None  # the family id of the refiner that may take over its sampling (SDXL base)
    loader: Loader | None = None  # a family that opens its own files and runs its own pipeline class (None: SD's)

    @property
    def family_id(self) -> str:
        return self.family or self.name

    def default_prediction(self, path: Path) -> tuple[str, str]:
        """(prediction type, why) when the file says nothing."""
        if self.prediction_hint is not None and self.prediction_hint(path):
            return V_PREDICTION, self.prediction_hint_reason
        return self.prediction, "family default"

    @property
    def size_numbers(self) -> int:
        """How many numbers the SGM vector `y` embeds after the pooled text (0 without one)."""
        return 0 if self.size_vector is None else len(self.size_vector(1, 1, False))


_RECORDS: dict[str, FamilyRecord] = {}
_builtin_loaded = False


def _ensure_builtin() -> None:
    """Register the built-in records on first use (their module imports the weights layer, which imports this)."""
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        import optimized_sd.families.flux  # noqa: F401  (registers on import)
        import optimized_sd.families.flux2  # noqa: F401
        import optimized_sd.families.sd  # noqa: F401
        import optimized_sd.families.zimage  # noqa: F401


def register(record: FamilyRecord) -> FamilyRecord:
    """Add a family (a name taken already is refused: unregister it first)."""
    _ensure_builtin()
    if record.name in _RECORDS:
        raise ValueError(f"a model family named {record.name!r} is registered already")
    _RECORDS[record.name] = record
    return record


def unregister(name: str) -> None:
    _RECORDS.pop(name, None)


def records() -> list[FamilyRecord]:
    """Every registered family, in the order detection tries them (priority first, then registration)."""
    _ensure_builtin()
    return sorted(_RECORDS.values(), key=lambda record: -record.priority)


def by_name(name: str) -> FamilyRecord:
    """The record registered as `name`, else the main record of the family id `name` (a UserError if none)."""
    found = find(name)
    if found is None:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(sorted(_RECORDS))}")
    return found


def find(name: str) -> FamilyRecord | None:
    _ensure_builtin()
    if name in _RECORDS:
        return _RECORDS[name]
    return next((record for record in records() if record.family_id == name), None)


def record_for(config: ModelConfig) -> FamilyRecord:
    """The record of a model config: its family id, the variant whose UNet input matches when several share it."""
    _ensure_builtin()
    sharing = [record for record in records() if record.family_id == config.family]
    if not sharing:
        return by_name(config.family)
    return next((record for record in sharing if record.unet_in_channels == config.unet.in_channels), sharing[0])


def detect(shapes: Shapes) -> FamilyRecord | None:
    """The first family (by priority) whose telltales these shapes have, after its `check` passed; None if none."""
    for record in records():
        if record.detect(shapes):
            if record.check is not None:
                record.check(shapes)
            return record
    return None


def claiming(path: Path) -> FamilyRecord | None:
    """The first family with its own `loader` that claims the checkpoint at `path` (None: an SD checkpoint)."""
    return next((record for record in records() if record.loader is not None and record.loader.claims(path)), None)


T = TypeVar("T")


class FamilyView(Mapping[str, T], Generic[T]):
    """A live read-only table: family id -> a value derived from its record (the old per-family dicts, kept as
    names callers import, now computed from the registry)."""

    def __init__(self, value: Callable[[FamilyRecord], T], include: Callable[[FamilyRecord], bool] = lambda r: True) -> None:
        self._value, self._include = value, include

    def _table(self) -> dict[str, T]:
        table: dict[str, T] = {}
        for record in sorted(records(), key=lambda r: r.family_id != r.name):  # main records before variants
            if self._include(record):
                table.setdefault(record.family_id, self._value(record))
        return table

    def __getitem__(self, name: str) -> T:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

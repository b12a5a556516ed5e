"""Typed model configurations and presets for the Stable Diffusion families (SD 1.x, SD 2.x, SDXL)."""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from optimized_sd.errors import UserError
from optimized_sd.families import registry


@dataclass(frozen=True)
class UNetConfig:
    """LDM `UNetModel` hyper-parameters (CompVis v1-inference.yaml `unet_config.params`)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768
    num_head_channels: int = -1
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    transformer_depth_middle: int | None = None

    def heads(self, channels: int) -> int:
        """Attention heads of a transformer `channels` wide: a fixed count (SD 1.x: 8), or one head per
        `num_head_channels` (SD 2.x and SDXL: 64), as LDM's `num_heads` / `num_head_channels` say."""
        return channels // self.num_head_channels if self.num_head_channels > 0 else self.num_heads

    def depth(self, level: int) -> int:
        """Transformer layers in each attention block of `level` (0 where the level has no attention)."""
        if 2**level not in self.attention_resolutions:
            return 0
        return self.transformer_depth if isinstance(self.transformer_depth, int) else self.transformer_depth[level]

    def middle_depth(self) -> int:
        """Transformer layers of the middle block (SGM: the deepest level's unless given)."""
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return self.transformer_depth if isinstance(self.transformer_depth, int) else self.transformer_depth[-1]


@dataclass(frozen=True)
class VAEConfig:
    """LDM `AutoencoderKL` hyper-parameters (`first_stage_config.params.ddconfig`)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    use_quant_conv: bool = True  # the 1x1 quant_conv / post_quant_conv around the latent (Flux's VAE has none)
    patch: int = 1  # latent pixels folded into channels, patch x patch, between the VAE and the denoiser (Flux.2: 2)

    @property
    def downscale(self) -> int:
        """Pixels per denoiser latent along one axis (8 for SD, 16 for Flux.2's patchified latents)."""
        return 2 ** (len(self.ch_mult) - 1) * self.patch

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the denoiser sees (the VAE's `embed_dim`, times the patch's pixels)."""
        return self.embed_dim * self.patch * self.patch


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (openai/clip-vit-large-patch14 for SD 1.x)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    penultimate: bool = False  # SDXL: the hidden state before the last layer, without the final norm


@dataclass(frozen=True)
class OpenCLIPConfig:
    """OpenCLIP text transformer (`cond_stage_model.model` in SD 2.x: ViT-H, 1024 wide; SDXL's second
    tower `conditioner.embedders.1.model`: ViT-bigG, 1280 wide). `layers` is the number of residual
    blocks built and run: SD 2.x runs 23 of ViT-H's 24 (its "penultimate" layer then the final norm),
    SDXL runs all 32 of bigG's, taking the context before the last one and the pooled vector after it."""

    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 23
    intermediate_size: int = 4096
    context_length: int = 77
    penultimate: bool = False  # SDXL: context = hidden state before the last block, no final norm
    projection_dim: int | None = None  # SDXL: pooled vector = final-norm EOS token @ text_projection


FAMILY_NAMES: typing.Mapping[str, str] = registry.FamilyView(lambda record: record.display_name)
"""Family id -> the words users know it by (inspect, run summaries, errors), from the family records."""


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: UNet, VAE, text tower(s), plus the DDPM schedule constants.

    Text towers by family: SD 1.x `text` (CLIP ViT-L); SD 2.x `open_clip` (ViT-H); SDXL both (CLIP
    ViT-L then bigG, contexts concatenated); the SDXL refiner `open_clip` alone (bigG)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    scale_factor: float = 0.18215
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    family: str = "sd1"
    open_clip: OpenCLIPConfig | None = None
    # What the UNet predicts ("epsilon", "v_prediction": diffusers' names); SD 2.x 768-v predicts v.
    prediction_type: str = "epsilon"

    @property
    def record(self) -> registry.FamilyRecord:
        """This model's family record (a UserError for a family id no record has)."""
        return registry.record_for(self)

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES.get(self.family, self.family)

    @property
    def default_size(self) -> int:
        """Image side the family was trained at, the --H/--W default (its record's: 512 SD 1.x and SD 2.x base,
        768 SD 2.x v, 1024 SDXL)."""
        if registry.find(self.family) is None:
            return 512
        return self.record.defaults.size_for(self.prediction_type)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        """Build from a plain dict (as written by `to_json`; missing fields keep their defaults), every
        value checked against its field's type and range, so a bad file is one clear error, not a
        failure deep inside model building. A text tower section may be null (SD 2.x has no CLIP)."""
        sections = {"unet": UNetConfig, "vae": VAEConfig, "text": TextEncoderConfig, "open_clip": OpenCLIPConfig}
        top = checked_fields(cls, data, "", skip=set(sections))
        for name, kind in sections.items():
            if name not in data:
                continue
            if data[name] is None and type(None) in typing.get_args(typing.get_type_hints(cls)[name]):
                top[name] = None
            else:
                top[name] = kind(**checked_fields(kind, data[name], f"{name}."))
        return cls(**top)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        """Read a JSON config written by `to_json` (the `--config` override)."""
        try:
            text = Path(path).read_bytes()[:MAX_CONFIG_BYTES + 1]
            if len(text) > MAX_CONFIG_BYTES:
                raise UserError(f"config {path} is over {MAX_CONFIG_BYTES // 1024} KB; a model config is a few hundred bytes")
            return cls.from_dict(json.loads(text))
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except (OSError, ValueError, RecursionError) as error:
            raise UserError(f"cannot read config {path}: {str(error) or type(error).__name__}") from None


MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_INT = 2**20  # no SD size or count comes near it; bigger ones would only allocate without end


def checked_fields(kind: type, data: Any, prefix: str, skip: set[str] = frozenset()) -> dict[str, Any]:
    """`data`'s entries for the dataclass `kind`, each of its field's type: ints (not bools) from 1 to
    MAX_CONFIG_INT, finite positive floats, strings, non-empty lists of such ints (as tuples)."""
    if not isinstance(data, dict):
        raise UserError(f"bad model config: {prefix.rstrip('.') or 'the top level'} must be a JSON object")
    hints = typing.get_type_hints(kind)
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name in skip:
            continue
        if name not in hints:
            raise UserError(f"bad model config: unknown field {prefix}{name}")
        values[name] = checked_value(hints[name], value, f"{prefix}{name}")
    return values


def checked_value(hint: Any, value: Any, name: str) -> Any:
    """`value` as the field type `hint` says (int, float, str, bool, tuple[int, ...], or a union of
    them with None), or a UserError naming the field."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    errors: list[UserError] = []
    for option in (o for o in options if o is not type(None)):
        try:
            return checked_scalar(option, value, name)
        except UserError as error:
            errors.append(error)
    raise errors[0]


UNSET_ALLOWED = {"unet.num_head_channels"}  # LDM's -1: "use num_heads instead"


def checked_scalar(hint: Any, value: Any, name: str) -> Any:
    def whole(item: Any) -> int:
        if name in UNSET_ALLOWED and item == -1 and not isinstance(item, bool):
            return item
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= MAX_CONFIG_INT:
            raise UserError(f"bad model config: {name} must be a whole number from 1 to {MAX_CONFIG_INT}, not {item!r}")
        return item

    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"bad model config: {name} must be true or false, not {value!r}")
        return value
    if hint is int:
        return whole(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"bad model config: {name} must be a positive number, not {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"bad model config: {name} must be a string, not {value!r}")
        return value
    # tuple[int, ...]
    if not isinstance(value, list) or not value:
        raise UserError(f"bad model config: {name} must be a non-empty list of whole numbers, not {value!r}")
    return tuple(whole(item) for item in value)


SD15 = ModelConfig()

SD2_UNET = UNetConfig(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)

SD21_BASE = ModelConfig(unet=SD2_UNET, text=None, open_clip=OpenCLIPConfig(), family="sd2")
"""SD 2.x 512 base (eps): OpenCLIP ViT-H run to its 23rd of 24 layers, then the final norm."""

SD21_V = replace(SD21_BASE, prediction_type="v_prediction")
"""SD 2.x 768-v: the same networks, trained to predict v."""

SDXL_BASE = ModelConfig(
    unet=UNetConfig(
        model_channels=320,
        attention_resolutions=(4, 2),
        channel_mult=(1, 2, 4),
        num_head_channels=64,
        use_linear_in_transformer=True,
        transformer_depth=(1, 2, 10),
        context_dim=2048,
        adm_in_channels=2816,
    ),
    text=TextEncoderConfig(penultimate=True),
    open_clip=OpenCLIPConfig(width=1280, heads=20, layers=32, intermediate_size=5120, penultimate=True, projection_dim=1280),
    scale_factor=0.13025,
    family="sdxl",
)
"""SDXL base 1.0 (SGM sd_xl_base.yaml)."""

SDXL_REFINER = ModelConfig(
    unet=UNetConfig(
        model_channels=384,
        attention_resolutions=(4, 2),
        channel_mult=(1, 2, 4, 4),
        num_head_channels=64,
        use_linear_in_transformer=True,
        transformer_depth=4,
        context_dim=1280,
        adm_in_channels=2560,
    ),
    text=None,
    open_clip=SDXL_BASE.open_clip,
    scale_factor=0.13025,
    family="sdxl_refiner",
)
"""SDXL refiner 1.0 (SGM sd_xl_refiner.yaml): bigG alone, aesthetic-score conditioning."""
REFINER_SWITCH_DEFAULT = 0.8  # the share of the denoising an SDXL base runs before its refiner (AUTOMATIC1111's default)

# Prompt bounds (AUTOMATIC1111 has none). A prompt is refused past MAX_PROMPT_CHARS characters, past MAX_PROMPT_CHUNKS
# chunks of 75 tokens (2,464 context tokens: cross-attention memory grows with them, and a prompt of 100k BREAKs
# would need ~24 GB of context), with an emphasis weight that is not finite or past +-MAX_EMPHASIS_WEIGHT (1.1 ** 49
# already; the weighted context must stay finite in fp16, whose largest number is 65504), or with brackets nested
# past MAX_EMPHASIS_NESTING: the sum over its pieces of text of the brackets around each (AUTOMATIC1111 multiplies
# each piece by each of them, quadratic work; a written prompt needs a few hundred).
MAX_PROMPT_CHARS = 65536
MAX_PROMPT_CHUNKS = 32
MAX_EMPHASIS_WEIGHT = 100.0
MAX_EMPHASIS_NESTING = 100_000

TINY = ModelConfig(
    unet=UNetConfig(
        model_channels=32,
        attention_resolutions=(2, 1),
        num_res_blocks=1,
        channel_mult=(1, 2),
        num_heads=8,
        context_dim=64,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    text=TextEncoderConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
    ),
)
"""A model small enough for unit tests: every kind of block of SD 1.x, at toy widths."""


# The largest |weight| a LoRA may be applied at. Real use stays within a few units (AUTOMATIC1111's slider
# ends at 2); far beyond it a merged weight is noise, and in half precision it overflows to inf (a black image).
MAX_LORA_WEIGHT = 100.0


def check_lora_weight(weight: object, what: str) -> float:
    """The weight a LoRA is applied at, as a float; UserError naming `what` (the flag, tag or file) when it
    is not a number, not finite, or beyond +-MAX_LORA_WEIGHT."""
    try:
        value = float(weight)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what}: the weight {weight!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > MAX_LORA_WEIGHT:
        raise UserError(f"{what}: the weight {weight!r} must be a finite number from {-MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}")
    return value

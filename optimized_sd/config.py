"""Typed model configurations and presets for the Stable Diffusion 1.x family."""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optimized_sd.errors import UserError


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
    transformer_depth: int = 1
    context_dim: int = 768


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

    @property
    def downscale(self) -> int:
        """Pixels per latent along one axis (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)


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


@dataclass(frozen=True)
class ModelConfig:
    """A whole SD 1.x latent diffusion model: three networks plus the DDPM schedule constants."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scale_factor: float = 0.18215
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    family: str = "sd1"
    # What the UNet predicts ("epsilon", "v_prediction"); diffusers folders state it in scheduler_config.json.
    prediction_type: str = "epsilon"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        """Build from a plain dict (as written by `to_json`; missing fields keep their defaults), every
        value checked against its field's type and range, so a bad file is one clear error, not a
        failure deep inside model building."""
        sections = {"unet": UNetConfig, "vae": VAEConfig, "text": TextEncoderConfig}
        top = checked_fields(cls, data, "", skip=set(sections))
        for name, kind in sections.items():
            top[name] = kind(**checked_fields(kind, data.get(name, {}), f"{name}."))
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
    def whole(item: Any) -> int:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= MAX_CONFIG_INT:
            raise UserError(f"bad model config: {name} must be a whole number from 1 to {MAX_CONFIG_INT}, not {item!r}")
        return item

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

"""Typed model configurations and presets for the Stable Diffusion 1.x family."""

from __future__ import annotations

import json
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
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict (as written by `to_json`); lists become tuples."""

        def build(kind: type, values: dict[str, Any]) -> Any:
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        try:
            top = {k: v for k, v in data.items() if k not in ("unet", "vae", "text")}
            return cls(
                unet=build(UNetConfig, data.get("unet", {})),
                vae=build(VAEConfig, data.get("vae", {})),
                text=build(TextEncoderConfig, data.get("text", {})),
                **top,
            )
        except TypeError as error:
            raise UserError(f"bad model config: {error}") from None

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        """Read a JSON config written by `to_json` (the `--config` override)."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read config {path}: {error}") from None


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

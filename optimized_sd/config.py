"""Typed model configurations and presets for the Stable Diffusion families (SD 1.x, SD 2.x, SDXL)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
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


FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}
"""Family id -> the words users know it by (inspect, run summaries, errors)."""


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
    def family_name(self) -> str:
        return FAMILY_NAMES.get(self.family, self.family)

    @property
    def default_size(self) -> int:
        """Image side the family was trained at, the --H/--W default: 512 (SD 1.x, SD 2.x base), 768 (SD 2.x v),
        1024 (SDXL)."""
        if self.family in ("sdxl", "sdxl_refiner"):
            return 1024
        return 768 if self.family == "sd2" and self.prediction_type == "v_prediction" else 512

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict (as written by `to_json`); lists become tuples."""

        def build(kind: type, values: dict[str, Any] | None) -> Any:
            if values is None:
                return None
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        try:
            top = {k: v for k, v in data.items() if k not in ("unet", "vae", "text", "open_clip")}
            return cls(
                unet=build(UNetConfig, data.get("unet", {})),
                vae=build(VAEConfig, data.get("vae", {})),
                text=build(TextEncoderConfig, data.get("text", {})),
                open_clip=build(OpenCLIPConfig, data.get("open_clip")),
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

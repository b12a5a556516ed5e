"""The whole latent diffusion model as one module tree whose parameter names are the LDM/SGM checkpoint keys."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from optimized_sd.config import ModelConfig
from optimized_sd.models.conditioner import build_text_module, encode_tokens
from optimized_sd.models.unet import UNetModel
from optimized_sd.models.vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    """LDM's `model` attribute, which holds the denoiser (a UNet, or a family's transformer) as `diffusion_model`."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = denoiser


class TextTowers(nn.Module):
    """`text_encoders` of a family whose towers come as files of their own: each tower a child under its name
    (ComfyUI's: `clip_l`, `t5xxl`, `qwen3`), run in the order given."""

    def __init__(self, **towers: nn.Module) -> None:
        super().__init__()
        for name, tower in towers.items():
            self.add_module(name, tower)

    def towers(self) -> list[str]:
        return list(self._modules)


class PartsModel(nn.Module):
    """A model put together from separate files (Flux.1, Z-Image, Flux.2 klein) under the names the memory engine
    places: `model.diffusion_model` (the transformer), `first_stage_model` (the VAE), `text_encoders.<tower>`."""

    text_root = "text_encoders"

    def __init__(self, config: ModelConfig, transformer: nn.Module, vae: nn.Module, **towers: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(transformer)
        self.first_stage_model = vae
        self.text_encoders = TextTowers(**towers)


class LatentDiffusion(nn.Module):
    """`model.diffusion_model` (UNet), `first_stage_model` (VAE), and the text conditioning under the
    family's own name: `cond_stage_model` (SD 1.x CLIP, SD 2.x OpenCLIP) or `conditioner` (SDXL)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        self.text_root, text = build_text_module(config)
        self.add_module(self.text_root, text)

    def encode_text(self, ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """Token ids, one tensor per tower -> (context (B, 77, context_dim), pooled (B, width) or None)."""
        return encode_tokens(self.get_submodule(self.text_root), ids)

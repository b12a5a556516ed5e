"""The whole latent diffusion model as one module tree whose parameter names are the LDM/SGM checkpoint keys."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from optimized_sd.config import ModelConfig
from optimized_sd.models.conditioner import build_text_module, encode_tokens
from optimized_sd.models.unet import UNetModel
from optimized_sd.models.vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    """LDM's `model` attribute, which holds the UNet as `diffusion_model`."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = unet


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

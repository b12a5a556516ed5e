"""The whole latent diffusion model as one module tree whose parameter names are the LDM checkpoint keys."""

from __future__ import annotations

from torch import nn

from optimized_sd.config import ModelConfig
from optimized_sd.models.text_encoder import FrozenCLIPEmbedder
from optimized_sd.models.unet import UNetModel
from optimized_sd.models.vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    """LDM's `model` attribute, which holds the UNet as `diffusion_model`."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Module):
    """`model.diffusion_model` (UNet), `first_stage_model` (VAE), `cond_stage_model` (CLIP text)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        self.cond_stage_model = FrozenCLIPEmbedder(config.text)

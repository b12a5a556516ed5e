"""Live previews without a model: SD latents are close to a linear map of RGB, so a family's 4x3 matrix
(its record's `LatentFormat.rgb_factors`, plus bias) turns the sampler's latents into a recognisable (blurry,
off-colour) picture for the price of one small matrix product per preview."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from optimized_sd.families import registry
from optimized_sd.families.names import SD1
from optimized_sd.families.registry import LatentFormat


def latent_rgb(latent_format: LatentFormat) -> tuple[Tensor, Tensor]:
    """(channels, 3) latent channel -> (R, G, B) factors for latents in model space, and the (3,) bias."""
    return torch.tensor(latent_format.rgb_factors), torch.tensor(latent_format.rgb_bias)


# SD 1.x's factors (ComfyUI's `latent_formats.SD15`, fitted on VAE decodes), the default preview map.
SD1_LATENT_RGB = latent_rgb(registry.by_name(SD1).latent)[0]


def latent_preview(latents: Tensor, upscale: int = 8, latent_format: LatentFormat | None = None) -> Image.Image:
    """The first image of a (B, C, h, w) latent batch as an RGB picture of (w*upscale, h*upscale), by the
    family's latent format (default: SD 1.x's)."""
    factors, bias = (SD1_LATENT_RGB, torch.zeros(3)) if latent_format is None else latent_rgb(latent_format)
    latent = latents[0].detach().float().cpu()  # (C, h, w)
    rgb = torch.einsum("chw,cr->rhw", latent, factors) + bias[:, None, None]  # (3, h, w), about [-1, 1]
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()  # (h, w, 3)
    image = Image.fromarray(np.ascontiguousarray(array))
    return image.resize((image.width * upscale, image.height * upscale), Image.BILINEAR) if upscale > 1 else image

"""Live previews without a model: SD 1.x latents are close to a linear map of RGB, so a 4x3 matrix
turns the sampler's latents into a recognisable (blurry, off-colour) picture for the price of one
small matrix product per preview."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# Latent channel -> (R, G, B) for SD 1.x latents in model space (already times the 0.18215 scale
# factor); the widely used factors fitted on VAE decodes (ComfyUI's `latent_formats.SD15`).
SD1_LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def latent_preview(latents: Tensor, upscale: int = 8) -> Image.Image:
    """The first image of a (B, 4, h, w) latent batch as an RGB picture of (w*upscale, h*upscale)."""
    latent = latents[0].detach().float().cpu()  # (4, h, w)
    rgb = torch.einsum("chw,cr->rhw", latent, SD1_LATENT_RGB)  # (3, h, w), about [-1, 1]
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()  # (h, w, 3)
    image = Image.fromarray(np.ascontiguousarray(array))
    return image.resize((image.width * upscale, image.height * upscale), Image.BILINEAR) if upscale > 1 else image

"""Live previews of the sampling: the x0 estimate of a step as a picture, decoded by a TAESD (a tiny
decoder, a few MB, placed beside the model) or, without one, by the 4x3 latent projection below (one
small matrix product: blurry and off-colour, but free). The CLI writes them under `<outdir>/previews/`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from optimized_sd.errors import FieldError
from optimized_sd.families import registry
from optimized_sd.families.names import SD1
from optimized_sd.families.registry import LatentFormat
from optimized_sd.pipelines.images import tensor_to_image
from optimized_sd.pipelines.output import encode, write_new

if TYPE_CHECKING:
    from optimized_sd.models.taesd import TinyDecoder
    from optimized_sd.pipelines.request import GenerationRequest
    from optimized_sd.sampling import StepInfo

PREVIEW_METHODS = ("latent", "taesd")
PREVIEW_FOLDER = "previews"

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


def taesd_preview(latents: Tensor, decoder: TinyDecoder) -> Image.Image:
    """The first image of a latent batch (UNet space) decoded by a TAESD on the decoder's device and dtype."""
    weight = next(decoder.parameters())
    with torch.inference_mode():
        return tensor_to_image(decoder.decode(latents[:1].detach().to(weight.device, weight.dtype)))


def preview_decoder_path(method: str | None, decoder: Path | None, vae: Path | None, every: int) -> Path | None:
    """The TAESD file previews decode with (None: the latent projection) from `--preview`, `--preview-decoder`,
    `--vae` (a TAESD given as the VAE serves previews too) and `--preview-every`."""
    from optimized_sd.weights.taesd import is_taesd

    if method is not None and method not in PREVIEW_METHODS:
        raise FieldError.about("preview", f"{method!r} is unknown; use {' or '.join(PREVIEW_METHODS)}")
    if every < 0:
        raise FieldError.about("preview_every", f"{every} must be 0 (no previews) or more")
    if method == "latent" and decoder is not None:
        raise FieldError.about("preview", "latent uses no decoder; drop the preview decoder or preview with taesd")
    if method == "latent" or every == 0:
        return None
    if decoder is not None:
        return decoder
    if vae is not None and is_taesd(vae):
        return vae
    if method == "taesd":
        needed = "is needed for taesd previews: a TAESD decoder FILE (e.g. taesd_decoder.safetensors), or a TAESD as the VAE"
        raise FieldError.about("preview_decoder", needed)
    return None


@dataclass(frozen=True)
class PreviewWriter:
    """Writes the first image's preview every `every` sampling steps as
    `<folder>/seed_<seed>-step<k>_<n>.png` (`n` counts up rather than replace a file already there)."""

    folder: Path
    every: int

    def __call__(self, preview: Callable[[Tensor], Image.Image], request: GenerationRequest, info: StepInfo) -> Path | None:
        if info.denoised is None or info.step == 0 or info.step % self.every:
            return None
        stem = f"seed_{request.seed}-step{info.step:0{len(str(info.total))}d}"
        return write_new(self.folder, stem, "png", encode(preview(info.denoised), "png", ""), 0)

"""Inpainting and outpainting: img2img restricted to a mask.

The region to generate (the whole image or, "only masked", the mask's padded box; outpainting's
grown canvas) is prepared as the `mask` stage, the init image (and, for 9-channel UNets, the
masked image) encoded as `vae_encode`; then one of two rules, as diffusers'
`StableDiffusionInpaintPipeline`:
  * 9-channel inpainting UNets: the binarised mask on the latent grid and the latents of the image
    where the mask is < 0.5 are concatenated to the UNet input (`sampling.inpainting_concat`);
  * 4-channel UNets: after each step the unmasked latents are replaced by the init latents noised to
    the next step's level with the start noise (`sampling.masked_blend`).
Both start, like diffusers, from pure noise at strength 1 and otherwise from the init latents
noised to the level of the first step that runs (for DDIM/PLMS one grid step below img2img's
CompVis level); AUTOMATIC1111's "latent noise" and "latent nothing" first replace the masked init
latents by the start noise or by zeros (`masked_start`). The decoded images are pasted back into
the canvas through the blurred mask, so pixels outside the mask are the input's exactly.

One `Inpaint` object serves one call (`diffusion.task_for` builds it): it holds what that call
prepared between the steps `core.run_task` calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from optimized_sd.memory.report import StageRecord
from optimized_sd.pipelines.core import Task, encode_pixels
from optimized_sd.pipelines.images import image_to_tensor
from optimized_sd.pipelines.masks import InpaintOptions, Region, prepare_region
from optimized_sd.pipelines.request import INPAINTING_UNET_CHANNELS, GenerationRequest
from optimized_sd.sampling import Model, ProgressCallback, SamplingPlan, start_latents
from optimized_sd.sampling.inpainting import inpainting_concat, masked_blend, noised_to

if TYPE_CHECKING:
    from optimized_sd.pipelines.diffusion import StableDiffusion


def mask_tensor(mask: Image.Image) -> Tensor:
    """L mask -> (1, 1, H, W) float {0, 1}: binarised at 0.5 (diffusers' mask processor)."""
    return torch.from_numpy((np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32))[None, None]


def latent_mask(mask: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """The pixel mask on the latent grid: nearest-neighbour, as diffusers' `prepare_mask_latents`."""
    return F.interpolate(mask, size=latent_size)


def masked_start(init_latents: Tensor, noise: Tensor, mask: Tensor, masked_content: str) -> Tensor:
    """What the sampler starts from before noising, under the mask (1 = repaint): the init latents
    ("original", and "fill", whose pixels were filled before encoding), the start noise itself
    ("latent-noise": AUTOMATIC1111 draws it from the same seeds, so the same noise), or zeros
    ("latent-nothing"). The blend of 4-channel models keeps using the init latents outside the mask."""
    if masked_content == "latent-noise":
        return init_latents * (1 - mask) + noise * mask
    if masked_content == "latent-nothing":
        return init_latents * (1 - mask)
    return init_latents


class Inpaint(Task):
    name = "inpaint"
    encodes_image = True

    def __init__(self) -> None:
        self.region: Region | None = None
        self.mask: Tensor | None = None  # (1, 1, h, w) on the latent grid, 1 = repaint
        self.init_latents: Tensor | None = None  # (B, 4, h, w), 4-channel UNets only
        self.masked_latents: Tensor | None = None  # (B, 4, h, w), 9-channel UNets only
        self.noise: Tensor | None = None
        self.plan: SamplingPlan | None = None

    @staticmethod
    def options(request: GenerationRequest) -> InpaintOptions:
        assert request.inpaint is not None and request.init_image is not None
        return request.inpaint

    def strength(self, request: GenerationRequest) -> float:
        return request.strength

    def metadata_strength(self, request: GenerationRequest) -> float | None:
        return request.strength

    def start_latents(self, pipe: StableDiffusion, request: GenerationRequest, plan: SamplingPlan, noise: Tensor, tiled: bool) -> Tensor:
        options = self.options(request)
        latent_size = (noise.shape[-2], noise.shape[-1])

        def prepare(record: StageRecord) -> tuple[Region, Tensor, Tensor]:
            region = prepare_region(request.init_image, (request.width, request.height), options)
            pixels, mask = image_to_tensor(region.image), mask_tensor(region.mask)  # (1, 3, H, W), (1, 1, H, W)
            return region, pixels, mask

        self.region, pixels, mask = pipe.memory.run_stage("mask", prepare)
        self.mask = latent_mask(mask, latent_size).to(pipe.device)
        self.noise, self.plan = noise, plan
        batch = noise.shape[0]
        nine_channels = pipe.config.unet.in_channels == INPAINTING_UNET_CHANNELS
        if not nine_channels or plan.strength < 1.0:
            self.init_latents = encode_pixels(pipe, pixels, batch, tiled)
        if nine_channels:
            self.masked_latents = encode_pixels(pipe, pixels * (mask < 0.5), batch, tiled)
        if plan.strength == 1.0:
            return start_latents(plan, noise)  # pure noise, as diffusers at strength 1
        assert self.init_latents is not None
        return noised_to(plan, 0, masked_start(self.init_latents.float(), noise.float(), self.mask, options.masked_content), noise.float())

    def wrap_model(self, model: Model) -> Model:
        if self.masked_latents is None:
            return model
        assert self.mask is not None
        return inpainting_concat(model, self.mask, self.masked_latents)

    def step_callback(self, progress: ProgressCallback | None) -> ProgressCallback | None:
        if self.masked_latents is not None:
            return progress
        assert self.plan is not None and self.init_latents is not None and self.noise is not None and self.mask is not None
        return masked_blend(self.plan, self.init_latents, self.noise, self.mask, progress)

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        """Each generated image pasted back into the canvas through the blurred mask."""
        assert self.region is not None
        return [self.region.canvas.paste(image) for image in images]

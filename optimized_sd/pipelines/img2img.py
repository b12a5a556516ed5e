"""Image to image (SDEdit, Meng et al. 2022): the init image's latents, noised to the level where
`strength` of the schedule is left, are denoised from there."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import Tensor

from optimized_sd.pipelines.core import Task, encode_image
from optimized_sd.pipelines.request import GenerationRequest
from optimized_sd.sampling import SamplingPlan, start_latents

if TYPE_CHECKING:
    from optimized_sd.pipelines.diffusion import StableDiffusion


class Img2Img(Task):
    name = "img2img"
    encodes_image = True

    def normalise(self, request: GenerationRequest) -> GenerationRequest:
        """The output has the init image's size (`load_init_image` already resized it)."""
        assert request.init_image is not None
        return replace(request, width=request.init_image.width, height=request.init_image.height)

    def strength(self, request: GenerationRequest) -> float:
        return request.strength

    def start_latents(self, pipe: StableDiffusion, request: GenerationRequest, plan: SamplingPlan, noise: Tensor, tiled: bool) -> Tensor:
        assert request.init_image is not None
        init_latents = encode_image(pipe, request.init_image, noise.shape[0], tiled)
        return start_latents(plan, noise, init_latents)

    def metadata_strength(self, request: GenerationRequest) -> float | None:
        return request.strength


IMG2IMG = Img2Img()

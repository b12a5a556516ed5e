"""Text to image: the sampler starts from seeded noise over the whole schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from optimized_sd.pipelines.core import Task
from optimized_sd.pipelines.request import GenerationRequest
from optimized_sd.sampling import SamplingPlan, start_latents

if TYPE_CHECKING:
    from optimized_sd.pipelines.diffusion import StableDiffusion


class Txt2Img(Task):
    name = "txt2img"

    def start_latents(self, pipe: StableDiffusion, request: GenerationRequest, plan: SamplingPlan, noise: Tensor, tiled: bool) -> Tensor:
        return start_latents(plan, noise)


TXT2IMG = Txt2Img()

"""Inpainting as two small wrappers, so no sampler and no UNet knows about masks.

* 9-channel inpainting UNets (sd-v1-5-inpainting; CompVis `scripts/inpaint.py`, diffusers'
  `StableDiffusionInpaintPipeline`): `inpainting_concat` appends the mask and the masked image's
  latents to the UNet input at every call.
* 4-channel UNets (diffusers' rule for them): after every step `masked_blend` puts back, where the
  mask is 0, the init latents noised to the level the next step starts from (the same noise the
  start latents were drawn with), and the clean init latents after the last step.

`mask` is (B or 1, 1, h, w) on the latent grid, 1 where the image is repainted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .conditioning import Conditioning
from .denoisers import Model
from .plan import ProgressCallback, SamplingPlan, StepInfo


def inpainting_concat(model: Model, mask: Tensor, masked_latents: Tensor) -> Model:
    """The model called on cat(x, mask, masked image latents) along channels: (B, 4 + 1 + 4, h, w).
    Guidance batches uncond and cond together, so the extra channels are tiled to x's batch."""
    extra = torch.cat([mask.expand(masked_latents.shape[0], -1, -1, -1), masked_latents], dim=1)  # (b, 5, h, w)

    def call(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        tiled = extra.to(x.device, x.dtype).repeat(x.shape[0] // extra.shape[0], 1, 1, 1)  # (B, 5, h, w)
        return model(torch.cat([x, tiled], dim=1), t, cond)

    return call


def noised_to(plan: SamplingPlan, index: int, x0: Tensor, noise: Tensor) -> Tensor:
    """x0 at the noise level of the input of step `index` (0-based) of `plan`, in the sampler's own
    variables (DDIM/PLMS: sqrt(abar) x0 + sqrt(1 - abar) noise; k-samplers: the model sampling's rule,
    x0 + sigma noise for eps/v, (1 - sigma) x0 + sigma noise for flow);
    x0 itself when `index` is past the last step. diffusers' `scheduler.add_noise` at that timestep."""
    if index >= plan.num_steps:
        return x0
    if plan.ddim_steps:
        alpha = plan.ddim_steps[index].alpha
        return math.sqrt(alpha) * x0 + math.sqrt(1.0 - alpha) * noise
    return plan.model_sampling.noise_image(x0, noise, plan.sigmas[index])


def masked_blend(
    plan: SamplingPlan, init_latents: Tensor, noise: Tensor, mask: Tensor, progress: ProgressCallback | None
) -> ProgressCallback:
    """A progress callback that, after each step, sets x = mask * x + (1 - mask) * init latents at
    the next step's level, in place (the sampler continues from the same tensor), then calls `progress`."""
    init_latents, noise = init_latents.float(), noise.float()
    mask = mask.float()

    def blend(info: StepInfo) -> None:
        if info.step > 0:
            known = noised_to(plan, info.step, init_latents, noise)
            info.x.copy_(mask * info.x + (1 - mask) * known)
        if progress is not None:
            progress(info)

    return blend

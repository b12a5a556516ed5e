"""Noise schedules and samplers (DDIM/PLMS as CompVis, k-diffusion family) over an eps model.

The pipelines use only: `make_plan` -> `start_latents` -> `sample`, plus `SAMPLERS` and
`sampler_display_name`. Nothing here knows the UNet; it sees `eps_model(x_in, t) -> eps`.
"""

from .plan import SAMPLERS, SamplingPlan, make_plan, sample, sampler_display_name, start_latents
from .schedules import DiscreteSchedule, scaled_linear_schedule

__all__ = [
    "SAMPLERS",
    "DiscreteSchedule",
    "SamplingPlan",
    "make_plan",
    "sample",
    "sampler_display_name",
    "scaled_linear_schedule",
    "start_latents",
]

"""Noise schedules, denoiser wrappers and samplers (DDIM/PLMS as CompVis, k-diffusion family).

The pipelines use: `Conditioning`, the wrappers of `denoisers` (prediction adapter, CFG) to turn
a model call into `eps_model(x_in, t) -> eps`, then `make_plan` -> `start_latents` -> `sample`
(with a `StepInfo` progress callback), plus `SAMPLERS` and `sampler_display_name`. Nothing here
knows the UNet.
"""

from .conditioning import Conditioning
from .denoisers import PREDICTION_TYPES, EpsFn, Model, classifier_free_guidance, prediction_adapter
from .plan import (
    SAMPLERS,
    SCHEDULE_TYPES,
    ProgressCallback,
    SamplingPlan,
    StepInfo,
    handover_step,
    make_plan,
    sample,
    sampler_display_name,
    schedule_display_name,
    start_latents,
)
from .schedules import DiscreteSchedule, scaled_linear_schedule

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULE_TYPES",
    "Conditioning",
    "DiscreteSchedule",
    "EpsFn",
    "Model",
    "ProgressCallback",
    "SamplingPlan",
    "StepInfo",
    "classifier_free_guidance",
    "handover_step",
    "prediction_adapter",
    "make_plan",
    "sample",
    "sampler_display_name",
    "schedule_display_name",
    "scaled_linear_schedule",
    "start_latents",
]

"""Noise schedules, denoiser wrappers and samplers (DDIM/PLMS as CompVis, k-diffusion family).

The pipelines use: `Conditioning`, the model's `ModelSampling` (eps, v, flow) and the wrappers of
`denoisers` (its prediction, side networks, CFG) to turn a model call into `eps_model(x_in, t) -> eps`
(a flow's velocity), then `make_plan` -> `start_latents` -> `sample`
(with a `StepInfo` progress callback), plus `SAMPLERS` and `sampler_display_name`. Nothing here
knows the UNet.
"""

from .conditioning import Conditioning, ControlResiduals
from .denoisers import PREDICTION_TYPES, EpsFn, Model, SideNetwork, classifier_free_guidance, prediction_adapter, with_side_network
from .model_sampling import EpsSampling, FlowSampling, ModelSampling, VSampling, discrete_sampling, flow_mu
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
    "ControlResiduals",
    "DiscreteSchedule",
    "EpsFn",
    "EpsSampling",
    "FlowSampling",
    "Model",
    "ModelSampling",
    "ProgressCallback",
    "SamplingPlan",
    "SideNetwork",
    "StepInfo",
    "VSampling",
    "classifier_free_guidance",
    "discrete_sampling",
    "flow_mu",
    "handover_step",
    "prediction_adapter",
    "make_plan",
    "sample",
    "sampler_display_name",
    "schedule_display_name",
    "scaled_linear_schedule",
    "start_latents",
    "with_side_network",
]

"""Denoiser wrappers (k-diffusion `external.py`, sgm `denoiser_scaling.py`): each is a few lines
around a model, so guidance and parameterisation never become branches in the pipeline or UNet.

The chain the pipelines build, innermost first:

    Model (x_in, t, Conditioning) -> raw UNet output          (pipelines: the UNet call)
    prediction adapter: raw output -> eps                       (`eps_prediction`, `v_prediction`)
    `classifier_free_guidance`: binds the conditioning -> EpsFn (x_in, t) -> eps
    `eps_denoiser`: EpsFn -> k-diffusion's D(x, sigma) -> x0    (k-samplers; DDIM/PLMS take the EpsFn)

`x_in` is the variance-preserving latent, `t` a float32 (B,) timestep (fractional for k-samplers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .conditioning import Conditioning
from .k_samplers import Denoiser
from .schedules import DiscreteSchedule

Model = Callable[[Tensor, Tensor, Conditioning], Tensor]
EpsFn = Callable[[Tensor, Tensor], Tensor]
PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' names, as a model's config spells them


def eps_prediction(model: Model, schedule: DiscreteSchedule) -> Model:
    """A model trained to predict the noise already gives eps (SD 1.x, SD 2.x-base)."""
    return model


def v_prediction(model: Model, schedule: DiscreteSchedule) -> Model:
    """v-parameterisation (Salimans & Ho 2022; SD 2.x-768): v = sqrt(abar) eps - sqrt(1 - abar) x0,
    so eps = sqrt(abar_t) * v + sqrt(1 - abar_t) * x_t with abar read off the schedule at t."""

    def eps(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        alpha_bar = schedule.alphas_cumprod_at(t).to(x.device, torch.float32).view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
        return alpha_bar.sqrt() * model(x, t, cond) + (1 - alpha_bar).sqrt() * x

    return eps


_ADAPTERS: dict[str, Callable[[Model, DiscreteSchedule], Model]] = {"epsilon": eps_prediction, "v_prediction": v_prediction}


def prediction_adapter(model: Model, prediction_type: str, schedule: DiscreteSchedule) -> Model:
    """The adapter that turns `model`'s output into eps, by the model's `prediction_type`."""
    if prediction_type not in _ADAPTERS:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return _ADAPTERS[prediction_type](model, schedule)


def classifier_free_guidance(model: Model, cond: Conditioning, uncond: Conditioning | None, scale: float) -> EpsFn:
    """Ho & Salimans (2022): out_u + scale * (out_c - out_u), uncond and cond in one batched call.
    Without `uncond` the model runs on `cond` alone (guidance off)."""
    if uncond is None:
        return lambda x, t: model(x, t, cond)
    both = uncond.cat(cond)  # batched once, used at every step

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


def eps_denoiser(eps: Callable[[Tensor, float], Tensor], schedule: DiscreteSchedule) -> Denoiser:
    """Discrete eps parameterisation (k-diffusion's DiscreteEpsDDPMDenoiser): the UNet sees
    c_in * x = x / sqrt(sigma^2 + 1) (its variance-preserving input) at the timestep whose sigma
    matches by log-sigma interpolation, and x0 = x - sigma * eps."""

    def denoise(x: Tensor, sigma: float) -> Tensor:
        c_in = 1.0 / math.sqrt(sigma**2 + 1.0)
        return x - sigma * eps(x * c_in, schedule.sigma_to_t(sigma))

    return denoise

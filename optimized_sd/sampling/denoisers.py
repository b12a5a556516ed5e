"""Denoiser wrappers (k-diffusion `external.py`, sgm `denoiser_scaling.py`): each is a few lines
around a model, so guidance and parameterisation never become branches in the pipeline or UNet.

The chain the pipelines build, innermost first:

    Model (x_in, t, Conditioning) -> raw UNet output          (pipelines: the UNet call)
    prediction: raw output -> eps (or a flow's velocity)        (`ModelSampling.prediction`: `v_prediction`...)
    `with_side_network`: side inputs (ControlNet residuals) computed per call into the conditioning
    `classifier_free_guidance`: binds the conditioning -> EpsFn (x_in, t) -> prediction
    `ModelSampling.denoiser`: -> k-diffusion's D(x, sigma) -> x0  (k-samplers; DDIM/PLMS take the EpsFn)

`x_in` is the model's input (c_in * x), `t` a float32 (B,) timestep (fractional for k-samplers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .conditioning import Conditioning, ControlResiduals
from .k_samplers import Denoiser
from .schedules import DiscreteSchedule

Model = Callable[[Tensor, Tensor, Conditioning], Tensor]
# (x_in, t, cond) -> residuals for the UNet, or None when it adds nothing to this call (a ControlNet outside its window)
SideNetwork = Callable[[Tensor, Tensor, Conditioning], ControlResiduals | None]
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


def with_side_network(model: Model, side_network: SideNetwork) -> Model:
    """The model called with the residuals `side_network(x_in, t, cond)` computes for this very call
    (a ControlNet's hook): under guidance x, t and cond are the batched uncond and cond halves, so each
    half gets the residuals of its own conditioning."""

    def call(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        residuals = side_network(x, t, cond)
        return model(x, t, cond if residuals is None else cond.with_control(residuals))

    return call


def classifier_free_guidance(
    model: Model, cond: Conditioning, uncond: Conditioning | None, scale: float, side_network: SideNetwork | None = None
) -> EpsFn:
    """Ho & Salimans (2022): out_u + scale * (out_c - out_u), uncond and cond in one batched call (their
    side inputs batched with them). Without `uncond` the model runs on `cond` alone (guidance off).
    Guiding the prediction is guiding D(x, sigma): x0 is affine in it with the same terms for both halves."""
    if side_network is not None:
        model = with_side_network(model, side_network)
    if uncond is None:
        return lambda x, t: model(x, t, cond)
    both = uncond.cat(cond)  # batched once, used at every step

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


def scaled_denoiser(
    fn: Callable[[Tensor, float], Tensor], input_scale: Callable[[float], float], timestep: Callable[[float], float]
) -> Denoiser:
    """k-diffusion's D(x, sigma) over a model predicting eps or a flow's velocity: both give
    x0 = x - sigma * prediction, the model seeing c_in * x at its timestep for sigma
    (`model_sampling` supplies c_in and the timestep rule)."""

    def denoise(x: Tensor, sigma: float) -> Tensor:
        return x - sigma * fn(x * input_scale(sigma), timestep(sigma))

    return denoise


def discrete_input_scale(sigma: float) -> float:
    """c_in = 1 / sqrt(sigma^2 + 1): the variance-preserving input a DDPM-trained UNet expects."""
    return 1.0 / math.sqrt(sigma**2 + 1.0)


def eps_denoiser(eps: Callable[[Tensor, float], Tensor], schedule: DiscreteSchedule) -> Denoiser:
    """Discrete eps parameterisation (k-diffusion's DiscreteEpsDDPMDenoiser): the UNet sees
    c_in * x = x / sqrt(sigma^2 + 1) (its variance-preserving input) at the timestep whose sigma
    matches by log-sigma interpolation, and x0 = x - sigma * eps."""
    return scaled_denoiser(eps, discrete_input_scale, schedule.sigma_to_t)

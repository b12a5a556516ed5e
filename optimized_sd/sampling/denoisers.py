"""Denoiser wrappers: turn the UNet's eps prediction into k-diffusion's D(x, sigma) -> x0."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from .k_samplers import Denoiser
from .schedules import DiscreteSchedule


def eps_denoiser(eps: Callable[[Tensor, float], Tensor], schedule: DiscreteSchedule) -> Denoiser:
    """Discrete eps parameterisation (k-diffusion's DiscreteEpsDDPMDenoiser): the UNet sees
    c_in * x = x / sqrt(sigma^2 + 1) (its variance-preserving input) at the timestep whose sigma
    matches by log-sigma interpolation, and x0 = x - sigma * eps."""

    def denoise(x: Tensor, sigma: float) -> Tensor:
        c_in = 1.0 / math.sqrt(sigma**2 + 1.0)
        return x - sigma * eps(x * c_in, schedule.sigma_to_t(sigma))

    return denoise

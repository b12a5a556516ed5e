"""Noise schedules: the discrete DDPM schedule of SD 1.x and the step grids the samplers walk.

All grids are computed in float64 on the CPU and returned as plain Python floats/ints, so the
samplers never synchronise with the GPU to read a sigma and the numbers are identical on every
device. "sigma" is the variance-exploding noise level of Karras et al. (2022):
x_ve = x0 + sigma * eps, sigma = sqrt((1 - abar) / abar), x_vp = x_ve / sqrt(sigma^2 + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """A trained DDPM schedule: abar_t for t = 0..N-1 (Ho et al. 2020), float64."""

    alphas_cumprod: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:  # accept a checkpoint's float32 tensor too
        object.__setattr__(self, "alphas_cumprod", np.asarray(self.alphas_cumprod, dtype=np.float64))

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @cached_property
    def sigmas(self) -> np.ndarray:
        """sigma_t = sqrt((1 - abar_t) / abar_t), increasing with t."""
        ac = self.alphas_cumprod
        return np.sqrt((1.0 - ac) / ac)

    @cached_property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        """Fractional timestep of a sigma by linear interpolation in log sigma (k-diffusion, diffusers)."""
        ls = self.log_sigmas
        log_sigma = math.log(max(sigma, 1e-10))
        low = int(np.searchsorted(ls, log_sigma, side="right")) - 1
        low = min(max(low, 0), ls.shape[0] - 2)
        w = (ls[low] - log_sigma) / (ls[low] - ls[low + 1])
        return low + min(max(float(w), 0.0), 1.0)

    def alphas_cumprod_at(self, t: Tensor) -> Tensor:
        """abar at (fractional) timesteps t, log sigma interpolated linearly: the exact inverse of
        `sigma_to_t`, so a k-sampler's sigma gives back its own abar = 1 / (sigma^2 + 1), and a
        whole t gives abar_t. Float64 where the device has it."""
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        log_sigmas = torch.as_tensor(self.log_sigmas, dtype=dtype, device=t.device)
        t = t.to(dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        weight = t - low
        log_sigma = log_sigmas[low] * (1 - weight) + log_sigmas[low + 1] * weight
        return torch.sigmoid(-2 * log_sigma)  # 1 / (1 + sigma^2)

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        """Sigma at (fractional) timesteps by linear interpolation in sigma (diffusers' `np.interp`)."""
        return np.interp(t, np.arange(self.num_timesteps), self.sigmas)

    def t_to_sigma_log(self, t: np.ndarray) -> np.ndarray:
        """Sigma at (fractional) timesteps by linear interpolation in log sigma (k-diffusion's
        `DiscreteSchedule.t_to_sigma`, which AUTOMATIC1111's Uniform and SGM Uniform use)."""
        return np.exp(np.interp(t, np.arange(self.num_timesteps), self.log_sigmas))


def scaled_linear_schedule(
    beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000
) -> DiscreteSchedule:
    """The "scaled linear" betas of latent diffusion: linear in sqrt(beta) (Rombach et al. 2022)."""
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), steps, dtype=np.float64) ** 2
    return DiscreteSchedule(alphas_cumprod=np.cumprod(1.0 - betas))


def _with_zero(sigmas: np.ndarray) -> tuple[float, ...]:
    return tuple(float(s) for s in sigmas) + (0.0,)


def linspace_sigmas(schedule: DiscreteSchedule, steps: int) -> tuple[float, ...]:
    """diffusers' "linspace" spacing (the default of its Euler/Heun/KDPM2/LMS/DPMSolverSDE schedulers).

    t = linspace(0, N-1, steps) from high to low, sigma linearly interpolated in sigma, then a final
    0. For steps == 1 that grid is t = 0 (almost no noise), so we use t = N-1 instead.
    """
    n = schedule.num_timesteps
    t = np.linspace(0, n - 1, steps)[::-1] if steps > 1 else np.array([n - 1.0])
    return _with_zero(schedule.t_to_sigma(t))


def dpm_solver_sigmas(schedule: DiscreteSchedule, steps: int) -> tuple[float, ...]:
    """DPMSolverMultistepScheduler's "linspace" spacing: round(linspace(0, N-1, steps+1)), highest
    `steps` of them, so every sigma is a trained timestep's sigma; then a final 0."""
    n = schedule.num_timesteps
    t = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    return _with_zero(schedule.sigmas[t])


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> tuple[float, ...]:
    """Karras et al. (2022) eq. 5: equal steps in sigma^(1/rho) from sigma_max to sigma_min; then 0."""
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> tuple[float, ...]:
    """k-diffusion's own grid (`DiscreteSchedule.get_sigmas`, AUTOMATIC1111's "Uniform"):
    t = linspace(N-1, 0, steps), sigma interpolated in log sigma; then 0."""
    t = np.linspace(schedule.num_timesteps - 1, 0, steps)
    return _with_zero(schedule.t_to_sigma_log(t))


def sgm_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> tuple[float, ...]:
    """AUTOMATIC1111's "SGM Uniform" (sgm's discretisation): `steps` of the steps + 1 evenly spaced
    timesteps from sigma_max's to sigma_min's, dropping the last; log-sigma interpolation; then 0."""
    start, end = schedule.sigma_to_t(schedule.sigma_max), schedule.sigma_to_t(schedule.sigma_min)
    t = np.linspace(start, end, steps + 1)[:-1]
    return _with_zero(schedule.t_to_sigma_log(t))


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> tuple[float, ...]:
    """k-diffusion's `get_sigmas_exponential`: equal steps in log sigma from sigma_max to sigma_min; then 0."""
    return _with_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps)))


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """CompVis' "uniform" DDIM grid: range(0, N, N // steps) + 1, ascending.

    Kept exactly, quirks included: when N // steps does not divide N the grid has more than
    `steps` entries (steps=30 gives 31 timesteps 1, 34, ..., 991). One quirk is mended: where the
    grid would reach timestep N itself (steps=3 gives 1, 334, 667, 1000), CompVis indexes past the
    schedule and crashes; that last entry is dropped.
    """
    grid = np.asarray(range(0, num_timesteps, num_timesteps // steps), dtype=np.int64) + 1
    return grid[grid < num_timesteps]

"""Model sampling: what a family's parameterisation decides, as one object (ComfyUI's `model_sampling`,
sgm's denoiser scalings), so samplers see k-diffusion's D(x, sigma) only.

Each kind owns: sigma -> the timestep the model is called with, the input scaling c_in, the model's
raw output -> the prediction `denoised` reads (`prediction`, applied per call inside guidance), the
denoised estimate x0 = x - sigma * prediction, noising an image to a sigma (img2img, inpainting) and
its sigma table. Two families of rules:

* discrete DDPM (`EpsSampling`, `VSampling`; SD 1.x/2.x/SDXL): x = x0 + sigma * noise (variance
  exploding), the model sees x / sqrt(sigma^2 + 1) at the timestep of its sigma, predicts eps (v is
  turned into eps first); the sigma table is the trained `DiscreteSchedule`.
* rectified flow (`FlowSampling`; SD3, Flux): x = (1 - sigma) x0 + sigma * noise with sigma = t in
  [0, 1], the model sees x unscaled at t * `timestep_scale` and predicts the velocity v = noise - x0,
  so x0 = x - sigma * v; the sigmas are diffusers' `FlowMatchEulerDiscreteScheduler` grid, shifted by
  a fixed `shift` or by `mu` from the image's token count (dynamic shifting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from torch import Tensor

from .denoisers import PREDICTION_TYPES, Model, discrete_input_scale, scaled_denoiser, v_prediction
from .k_samplers import Denoiser
from .schedules import DiscreteSchedule, linspace_sigmas

PredictionFn = Callable[[Tensor, float], Tensor]  # (model input, timestep) -> prediction (eps or velocity)


class ModelSampling:
    """The rules one parameterisation gives the sampler (subclasses fill them in)."""

    schedule: DiscreteSchedule | None = None  # the trained DDPM table (discrete kinds; DDIM/PLMS need it)
    num_timesteps: int = 1000  # training timesteps: the bound on steps, the refiner's switch scale

    @property
    def discrete(self) -> bool:
        """Whether DDIM/PLMS (CompVis' timestep grid over the DDPM table) can run on this kind."""
        return self.schedule is not None

    @property
    def sigma_max(self) -> float:
        raise NotImplementedError

    def timestep(self, sigma: float) -> float:
        """The timestep the model is called with at noise level `sigma`."""
        raise NotImplementedError

    def input_scale(self, sigma: float) -> float:
        """c_in: what x is multiplied by before the model sees it."""
        raise NotImplementedError

    def prediction(self, model: Model) -> Model:
        """The model whose output `denoised` reads, from the raw one (applied per call, inside guidance)."""
        return model

    def sigmas(self, steps: int) -> tuple[float, ...]:
        """The default grid of `steps` sigmas, high to low, then a final 0."""
        raise NotImplementedError

    def denoised(self, x: Tensor, sigma: float, prediction: Tensor) -> Tensor:
        """x0 from the prediction: eps (x = x0 + sigma eps) and velocity (x = x0 + sigma v) alike."""
        return x - sigma * prediction

    def denoiser(self, fn: PredictionFn) -> Denoiser:
        """k-diffusion's D(x, sigma) -> x0 over `fn(c_in * x, timestep(sigma))`, what k-samplers walk."""
        return scaled_denoiser(fn, self.input_scale, self.timestep)

    def noise_image(self, x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
        """x0 noised to `sigma` in the sampler's own variables (diffusers' add_noise / scale_noise)."""
        raise NotImplementedError

    def initial_latents(self, noise: Tensor, sigma: float) -> Tensor:
        """Where txt2img starts: noise at the grid's first sigma (k-diffusion's noise * sigma_max; for flow
        sigma is 1 and this is the noise itself)."""
        return noise * sigma


@dataclass(frozen=True, eq=False)
class EpsSampling(ModelSampling):
    """Discrete DDPM, eps prediction (k-diffusion's DiscreteEpsDDPMDenoiser): SD 1.x, SD 2.x-base, SDXL."""

    schedule: DiscreteSchedule

    @property
    def num_timesteps(self) -> int:  # type: ignore[override]
        return self.schedule.num_timesteps

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def timestep(self, sigma: float) -> float:
        return self.schedule.sigma_to_t(sigma)

    def input_scale(self, sigma: float) -> float:
        return discrete_input_scale(sigma)

    def sigmas(self, steps: int) -> tuple[float, ...]:
        return linspace_sigmas(self.schedule, steps)

    def noise_image(self, x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
        return x0 + sigma * noise


class VSampling(EpsSampling):
    """Discrete DDPM, v prediction (Salimans & Ho 2022; SD 2.x-768): v becomes eps per call, the rest is eps's."""

    def prediction(self, model: Model) -> Model:
        return v_prediction(model, self.schedule)


_DISCRETE_KINDS: dict[str, type[EpsSampling]] = {"epsilon": EpsSampling, "v_prediction": VSampling}


def discrete_sampling(prediction_type: str, schedule: DiscreteSchedule) -> EpsSampling:
    """The model sampling of a DDPM-trained model by its `prediction_type` (diffusers' names)."""
    if prediction_type not in _DISCRETE_KINDS:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return _DISCRETE_KINDS[prediction_type](schedule)


def flow_mu(tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The dynamic shift mu for an image of `tokens` latent patches: linear through (base_tokens, base_shift)
    and (max_tokens, max_shift), extrapolated beyond (diffusers' `calculate_shift`, Flux's defaults)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (tokens - base_tokens)


def empirical_mu(tokens: int, steps: int) -> float:
    """Flux.2's dynamic shift mu, fitted by step count and image tokens (diffusers' `compute_empirical_mu`): linear
    in the steps between the fits for 10 and 200 steps, each linear in the tokens; past 4300 tokens the 200-step fit."""
    fit_10, fit_200 = 8.73809524e-05 * tokens + 1.89833333, 0.00016927 * tokens + 0.45666666
    if tokens > 4300:
        return fit_200
    slope = (fit_200 - fit_10) / 190.0
    return slope * steps + fit_200 - 200.0 * slope


@dataclass(frozen=True)
class FlowSampling(ModelSampling):
    """Rectified flow (Liu et al. 2022; Esser et al. 2024): sigma = t in [0, 1], velocity prediction.

    `shift` bends the grid towards high noise, sigma -> shift t / (1 + (shift - 1) t) (SD3); with
    `dynamic` the shift comes per image from `mu` instead, sigma -> e^mu / (e^mu + 1/t - 1) (Flux; set
    it with `at_tokens`). `timestep_scale` is what the model's timestep is sigma times: 1000 for models
    called as diffusers' SD3 transformer is, 1 for those that scale t themselves (Flux)."""

    shift: float = 1.0
    dynamic: bool = False
    mu: float | None = None
    timestep_scale: float = 1000.0
    num_timesteps: int = 1000
    flux_grid: bool = False  # N steps walk linspace(1, 1/N, N) (shifted) as diffusers' FluxPipeline passes them

    def at_tokens(self, tokens: int) -> FlowSampling:
        """This sampling for an image of `tokens` latent patches (sets mu when the shift is dynamic)."""
        return replace(self, mu=flow_mu(tokens)) if self.dynamic else self

    def shifted(self, t: np.ndarray) -> np.ndarray:
        """The shift applied to flow times t in (0, 1]."""
        if not self.dynamic:
            return self.shift * t / (1.0 + (self.shift - 1.0) * t)
        if self.mu is None:
            raise ValueError("a dynamically shifted flow needs mu (FlowSampling.at_tokens)")
        return math.exp(self.mu) / (math.exp(self.mu) + (1.0 / t - 1.0))

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(highest, lowest) sigma of the training table t = N/N ... 1/N, shifted there when the shift is fixed."""
        ends = np.array([1.0, 1.0 / self.num_timesteps])
        high, low = ends if self.dynamic else self.shifted(ends)
        return float(high), float(low)

    @property
    def sigma_max(self) -> float:
        return self.sigma_range[0]

    def timestep(self, sigma: float) -> float:
        return sigma * self.timestep_scale

    def input_scale(self, sigma: float) -> float:
        return 1.0

    def sigmas(self, steps: int) -> tuple[float, ...]:
        """FlowMatchEulerDiscreteScheduler.set_timesteps' default grid: `steps` times evenly spaced from the
        table's highest to its lowest sigma, shifted (again, for a fixed shift, as diffusers does), then 0."""
        high, low = (1.0, 1.0 / steps) if self.flux_grid else self.sigma_range
        return tuple(float(s) for s in self.shifted(np.linspace(high, low, steps))) + (0.0,)

    def noise_image(self, x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
        """The straight line from the image to the noise (diffusers' `scale_noise`)."""
        return (1.0 - sigma) * x0 + sigma * noise

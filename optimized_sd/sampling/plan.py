"""The sampling API the pipelines call: validate a request into a plan, make the start latents,
run the sampler.

Conventions, each chosen to match a reference:
* DDIM / PLMS: CompVis' uniform grid (`ddim_timesteps`), starting from unit-variance noise.
* k-samplers: sigmas from `linspace_sigmas` (diffusers' default "linspace" spacing of its
  Euler/Heun/KDPM2/LMS/DPMSolverSDE schedulers), `dpm_solver_sigmas` for dpmpp_2m(_sde)
  (DPMSolverMultistepScheduler's grid), or `karras_sigmas` between the model's sigma_min and
  sigma_max when karras=True. They start from noise * sigma_max (k-diffusion, A1111).
* img2img: t_enc = int(strength * steps) as CompVis. DDIM/PLMS noise the init latents to grid
  index t_enc and decode over grid[:t_enc] reversed; k-samplers run the last t_enc intervals of
  the full schedule from x0 + noise * sigmas[steps - t_enc] (A1111). strength 0 runs nothing.
  CompVis indexes past its grid at strength 1; here strength 1 runs the whole grid (the same
  steps as txt2img), with the init latents noised to its noisiest timestep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from . import k_samplers as k
from .compvis import DDIMStep, ddim_grid, sample_ddim, sample_plms
from .denoisers import eps_denoiser
from .schedules import DiscreteSchedule, dpm_solver_sigmas, karras_sigmas, linspace_sigmas, scaled_linear_schedule

_DISPLAY_NAMES = {  # our name -> AUTOMATIC1111's (written into image metadata)
    "ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2",
    "dpm2_a": "DPM2 a", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE",
}  # fmt: skip
SAMPLERS: tuple[str, ...] = tuple(_DISPLAY_NAMES)

_K_SAMPLERS = {
    "euler": k.sample_euler,
    "euler_a": k.sample_euler_ancestral,
    "heun": k.sample_heun,
    "dpm2": k.sample_dpm2,
    "dpm2_a": k.sample_dpm2_ancestral,
    "lms": k.sample_lms,
    "dpmpp_2m": k.sample_dpmpp_2m,
    "dpmpp_2m_sde": k.sample_dpmpp_2m_sde,
    "dpmpp_sde": k.sample_dpmpp_sde,
}
_COMPVIS = {"ddim": sample_ddim, "plms": sample_plms}


@dataclass(frozen=True, eq=False)
class StepInfo:
    """What a `sample` progress callback is told: before the first step (step 0, denoised None) and
    after each step. `x` is the sampler's float32 state after the step (DDIM/PLMS: the
    variance-preserving latents; k-samplers: x0 + sigma * noise) and may be updated in place (per-step
    mask blending); `denoised` is the x0 estimate that step moved towards (for previews)."""

    step: int
    total: int
    x: Tensor
    denoised: Tensor | None


ProgressCallback = Callable[[StepInfo], None]


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """What `sample` will run: for k-samplers the sigmas walked (start ... 0), for DDIM/PLMS the
    grid steps in sampling order and the level img2img noises the init latents to."""

    sampler: str
    steps: int
    strength: float
    eta: float
    karras: bool
    schedule: DiscreteSchedule
    sigmas: tuple[float, ...] = ()
    ddim_steps: tuple[DDIMStep, ...] = ()
    noise_step: DDIMStep | None = None

    @property
    def num_steps(self) -> int:
        """Sampler steps that will run (what `progress` counts to)."""
        return len(self.ddim_steps) if self.sampler in _COMPVIS else max(len(self.sigmas) - 1, 0)


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")


def _check(sampler: str, steps: int, strength: float, eta: float, karras: bool, num_timesteps: int) -> None:
    check_sampler(sampler)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise UserError(f"steps must be a whole number from 1 to {num_timesteps}, got {steps!r}")
    if not 0.0 <= strength <= 1.0:  # also rejects NaN
        raise UserError(f"strength must be between 0 and 1, got {strength}")
    if sampler in _COMPVIS and num_timesteps // steps < 2:
        raise UserError(f"{sampler} supports at most {num_timesteps // 2} steps (CompVis' grid), got {steps}")
    if karras and sampler in _COMPVIS:
        raise UserError(f"karras sigmas do not apply to {sampler}, which uses CompVis' fixed timestep grid")
    if sampler == "plms" and eta != 0:
        raise UserError(f"plms supports eta 0 only (as CompVis), got eta {eta}")
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must be between 0 and 1, got {eta}")
    if eta != 0 and sampler != "ddim":
        raise UserError(f"eta applies to the ddim sampler only, not to {sampler}")


def make_plan(
    sampler: str,
    steps: int,
    *,
    strength: float = 1.0,
    eta: float = 0.0,
    karras: bool = False,
    schedule: DiscreteSchedule | None = None,
) -> SamplingPlan:
    """Validate a request (UserError on bad input) and fix the steps that `sample` will run.

    DDIM/PLMS keep CompVis' grid, so some step counts run one step more (30 -> 31, see
    `schedules.ddim_timesteps`); `plan.num_steps` is the count that runs.
    """
    schedule = schedule if schedule is not None else scaled_linear_schedule()
    _check(sampler, steps, strength, eta, karras, schedule.num_timesteps)
    t_enc = int(strength * steps)
    common = dict(sampler=sampler, steps=steps, strength=strength, eta=eta, karras=karras, schedule=schedule)
    if sampler in _COMPVIS:
        grid = ddim_grid(schedule, steps, eta)
        n_run = len(grid) if t_enc >= steps else t_enc
        run = tuple(reversed(grid[:n_run]))
        noise_step = grid[t_enc] if t_enc < steps else grid[-1]
        return SamplingPlan(**common, ddim_steps=run, noise_step=noise_step)
    if karras:
        sigmas = karras_sigmas(schedule.sigma_min, schedule.sigma_max, steps)
    elif sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        sigmas = dpm_solver_sigmas(schedule, steps)
    else:
        sigmas = linspace_sigmas(schedule, steps)
    return SamplingPlan(**common, sigmas=sigmas[steps - t_enc :])


def start_latents(plan: SamplingPlan, noise: Tensor, init_latents: Tensor | None = None) -> Tensor:
    """The x `sample` starts from. txt2img: noise (DDIM/PLMS) or noise * sigma_max (k-samplers).
    img2img: the init latents noised to the plan's first level; unchanged when no step runs."""
    if init_latents is None:
        if plan.strength != 1.0:
            raise ValueError("txt2img needs a plan made with strength 1.0")
        return noise if plan.sampler in _COMPVIS else noise * plan.sigmas[0]
    if plan.num_steps == 0:
        return init_latents
    x0, eps = init_latents.float(), noise.to(init_latents.device, torch.float32)
    if plan.sampler in _COMPVIS:
        a = plan.noise_step.alpha  # CompVis stochastic_encode with the DDIM arrays
        x = math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps
    else:
        x = x0 + eps * plan.sigmas[0]
    return x.to(init_latents.dtype)


def _per_image_noise(generators: Sequence[torch.Generator], like: Tensor) -> k.Noise:
    """N(0, I) like `like`, image i drawn on the CPU from generators[i] in float32, so a seed gives
    the same image on any device."""

    def draw() -> Tensor:
        per_image = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(per_image).to(like.device)

    return draw


@torch.no_grad()
def sample(
    plan: SamplingPlan,
    eps_model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    generators: Sequence[torch.Generator],
    progress: ProgressCallback | None = None,
) -> Tensor:
    """Run the plan from `x` (from `start_latents`) and return the clean latents in x's dtype.

    `eps_model(x_in, t)` gets x_in in x's dtype and t as float32 [B]. The sampler state is kept
    in float32 whatever x's dtype, so fp16 models do not accumulate rounding over the steps.
    `progress(StepInfo)` is called before the first step and after each; whatever it raises
    (e.g. `errors.Interrupted`) stops sampling there and propagates.
    """
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {x.shape[0]}")
    total = plan.num_steps
    if total == 0:
        return x
    dtype, batch = x.dtype, x.shape[0]

    def eps(x_in: Tensor, t: float) -> Tensor:
        t_in = torch.full((batch,), float(t), dtype=torch.float32, device=x.device)
        return eps_model(x_in.to(dtype), t_in).float()

    noise = _per_image_noise(generators, x)
    state = x.float()
    callback = None
    if progress is not None:

        def callback(i: int, x_now: Tensor, denoised: Tensor) -> None:
            progress(StepInfo(i, total, x_now, denoised))

        progress(StepInfo(0, total, state, None))  # before the first step, so a progress bar times that step too
    if plan.sampler in _COMPVIS:
        out = _COMPVIS[plan.sampler](eps, state, plan.ddim_steps, noise, callback)
    else:
        out = _K_SAMPLERS[plan.sampler](eps_denoiser(eps, plan.schedule), state, plan.sigmas, noise, callback)
    return out.to(dtype)


def sampler_display_name(sampler: str, karras: bool) -> str:
    """AUTOMATIC1111's name for the sampler (written into image metadata)."""
    check_sampler(sampler)
    return _DISPLAY_NAMES[sampler] + (" Karras" if karras else "")

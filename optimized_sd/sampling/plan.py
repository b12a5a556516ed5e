"""The sampling API the pipelines call: validate a request into a plan, make the start latents,
run the sampler.

Conventions, each chosen to match a reference:
* DDIM / PLMS: CompVis' uniform grid (`ddim_timesteps`), starting from unit-variance noise.
* k-samplers: the sigma grid is the plan's schedule type. The default, "linspace", is diffusers'
  default spacing: `linspace_sigmas` (its Euler/Heun/KDPM2/LMS/DPMSolverSDE schedulers) or
  `dpm_solver_sigmas` for dpmpp_2m(_sde) (DPMSolverMultistepScheduler's grid). AUTOMATIC1111's
  "Schedule type" choices: "uniform" (k-diffusion's own grid), "karras", "exponential",
  "sgm_uniform", and "automatic" (the sampler's own default in AUTOMATIC1111: Karras for DPM++ 2M,
  DPM++ SDE, DPM2 and DPM2 a, Exponential for DPM++ 2M SDE, Uniform otherwise). karras=True is
  an alias of "karras". They start from noise * sigma_max (k-diffusion, A1111).
* img2img: t_enc = int(strength * steps) as CompVis. DDIM/PLMS noise the init latents to grid
  index t_enc and decode over grid[:t_enc] reversed; k-samplers run the last t_enc intervals of
  the full schedule from x0 + noise * sigmas[steps - t_enc] (A1111). strength 0 runs nothing.
  CompVis indexes past its grid at strength 1; here strength 1 runs the whole grid (the same
  steps as txt2img), with the init latents noised to its noisiest timestep.
* The plan's `model_sampling` (eps, v or flow; `sampling.model_sampling`) gives the denoiser, the
  start latents and the noised init latents. Flow models walk their own shifted grid with the
  deterministic k-samplers only: DDIM/PLMS need a DDPM table, and the ancestral/SDE samplers add
  noise by the variance-exploding rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FieldError
from . import k_samplers as k
from .compvis import DDIMStep, ddim_grid, sample_ddim, sample_plms
from .model_sampling import EpsSampling, ModelSampling
from .schedules import (
    DiscreteSchedule,
    dpm_solver_sigmas,
    exponential_sigmas,
    karras_sigmas,
    linspace_sigmas,
    scaled_linear_schedule,
    sgm_uniform_sigmas,
    uniform_sigmas,
)

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
_STOCHASTIC = ("euler_a", "dpm2_a", "dpmpp_sde", "dpmpp_2m_sde")  # add noise as x0 + sigma * noise (variance exploding)

_DPM_SOLVER = ("dpmpp_2m", "dpmpp_2m_sde")  # diffusers runs these on DPMSolverMultistepScheduler's own grid
# schedule type -> (AUTOMATIC1111's "Schedule type" name, sigmas for (schedule, sampler, steps))
_SCHEDULE_TYPES: dict[str, tuple[str, Callable[[DiscreteSchedule, str, int], tuple[float, ...]]]] = {
    "linspace": ("Linspace", lambda s, sampler, n: (dpm_solver_sigmas if sampler in _DPM_SOLVER else linspace_sigmas)(s, n)),
    "uniform": ("Uniform", lambda s, sampler, n: uniform_sigmas(s, n)),
    "karras": ("Karras", lambda s, sampler, n: karras_sigmas(s.sigma_min, s.sigma_max, n)),
    "exponential": ("Exponential", lambda s, sampler, n: exponential_sigmas(s.sigma_min, s.sigma_max, n)),
    "sgm_uniform": ("SGM Uniform", lambda s, sampler, n: sgm_uniform_sigmas(s, n)),
}  # fmt: skip
# AUTOMATIC1111's per-sampler default ("Automatic"); samplers not listed use "uniform"
_AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpm2": "karras", "dpm2_a": "karras", "dpmpp_2m_sde": "exponential"}
SCHEDULE_TYPES: tuple[str, ...] = (*_SCHEDULE_TYPES, "automatic")
DEFAULT_SCHEDULE_TYPE = "linspace"


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
    schedule: DiscreteSchedule | None  # the DDPM table (None for flow models)
    schedule_type: str = DEFAULT_SCHEDULE_TYPE  # resolved: never "automatic"; "" for DDIM/PLMS
    sigmas: tuple[float, ...] = ()
    ddim_steps: tuple[DDIMStep, ...] = ()
    noise_step: DDIMStep | None = None
    model_sampling: ModelSampling | None = None  # None: eps over `schedule`

    def __post_init__(self) -> None:
        if self.model_sampling is None:
            object.__setattr__(self, "model_sampling", EpsSampling(self.schedule))

    @property
    def num_steps(self) -> int:
        """Sampler steps that will run (what `progress` counts to)."""
        return len(self.ddim_steps) if self.sampler in _COMPVIS else max(len(self.sigmas) - 1, 0)


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise FieldError.about("sampler", f"{sampler!r} is unknown; choose one of: {', '.join(SAMPLERS)}")


def resolve_schedule_type(sampler: str, schedule_type: str | None, karras: bool = False) -> str:
    """The grid a k-sampler will walk: `schedule_type` (None: the default), karras=True as an alias
    of "karras", "automatic" as AUTOMATIC1111 resolves it for the sampler."""
    if schedule_type is None:
        schedule_type = "karras" if karras else DEFAULT_SCHEDULE_TYPE
    if schedule_type not in SCHEDULE_TYPES:
        raise FieldError.about("schedule", f"{schedule_type!r} is unknown; choose one of: {', '.join(SCHEDULE_TYPES)}")
    if karras and schedule_type != "karras":
        raise FieldError.about("karras", f"asks for the karras schedule but the schedule type is {schedule_type!r}")
    if schedule_type == "automatic":
        return _AUTOMATIC.get(sampler, "uniform")
    return schedule_type


def schedule_display_name(schedule_type: str) -> str:
    """AUTOMATIC1111's "Schedule type" for a resolved schedule type (image metadata)."""
    return _SCHEDULE_TYPES[schedule_type][0]


def _check(sampler: str, steps: int, strength: float, eta: float, karras: bool, num_timesteps: int) -> None:
    check_sampler(sampler)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise FieldError.about("steps", f"must be a whole number from 1 to {num_timesteps}, got {steps!r}")
    if not 0.0 <= strength <= 1.0:  # also rejects NaN
        raise FieldError.about("strength", f"must be between 0 and 1, got {strength}")
    if sampler in _COMPVIS and num_timesteps // steps < 2:
        raise FieldError.about("steps", f"{steps}: {sampler} supports at most {num_timesteps // 2} steps (CompVis' grid)")
    if karras and sampler in _COMPVIS:
        raise FieldError.about("karras", f"sigmas do not apply to {sampler}, which uses CompVis' fixed timestep grid")
    if sampler == "plms" and eta != 0:
        raise FieldError.about("eta", f"{eta}: plms supports eta 0 only (as CompVis)")
    if not 0.0 <= eta <= 1.0:
        raise FieldError.about("eta", f"must be between 0 and 1, got {eta}")
    if eta != 0 and sampler != "ddim":
        raise FieldError.about("eta", f"applies to the ddim sampler only, not to {sampler}")


def make_plan(
    sampler: str,
    steps: int,
    *,
    strength: float = 1.0,
    eta: float = 0.0,
    karras: bool = False,
    schedule: DiscreteSchedule | None = None,
    schedule_type: str | None = None,
    model_sampling: ModelSampling | None = None,
) -> SamplingPlan:
    """Validate a request (FieldError naming the request field on bad input) and fix the steps that `sample` will run.

    DDIM/PLMS keep CompVis' grid, so some step counts run one step more (30 -> 31, see
    `schedules.ddim_timesteps`); `plan.num_steps` is the count that runs. `schedule_type` picks
    the k-samplers' sigma grid (SCHEDULE_TYPES; DDIM/PLMS accept only the default). `model_sampling`
    (default: eps over `schedule`, itself SD's scaled linear one by default) says how the model is sampled.
    """
    if model_sampling is None:
        model_sampling = EpsSampling(schedule if schedule is not None else scaled_linear_schedule())
    schedule = model_sampling.schedule
    if schedule_type is not None and schedule_type not in SCHEDULE_TYPES:
        raise FieldError.about("schedule", f"{schedule_type!r} is unknown; choose one of: {', '.join(SCHEDULE_TYPES)}")
    _check(sampler, steps, strength, eta, karras, model_sampling.num_timesteps)
    t_enc = int(strength * steps)
    if schedule is None:
        return _flow_plan(sampler, steps, strength, t_enc, karras, schedule_type, model_sampling)
    if sampler in _COMPVIS:
        if schedule_type not in (None, DEFAULT_SCHEDULE_TYPE):
            raise FieldError.about("schedule", f"{schedule_type!r} does not apply to {sampler}, which uses CompVis' fixed timestep grid")
        grid = ddim_grid(schedule, steps, eta)
        n_run = len(grid) if t_enc >= steps else t_enc
        run = tuple(reversed(grid[:n_run]))
        noise_step = grid[t_enc] if t_enc < steps else grid[-1]
        common = dict(sampler=sampler, steps=steps, strength=strength, eta=eta, karras=False, schedule=schedule, schedule_type="")
        return SamplingPlan(**common, ddim_steps=run, noise_step=noise_step, model_sampling=model_sampling)
    resolved = resolve_schedule_type(sampler, schedule_type, karras)
    sigmas = _SCHEDULE_TYPES[resolved][1](schedule, sampler, steps)
    common = dict(sampler=sampler, steps=steps, strength=strength, eta=eta, karras=resolved == "karras", schedule=schedule)
    return SamplingPlan(**common, schedule_type=resolved, sigmas=sigmas[steps - t_enc :], model_sampling=model_sampling)


def _flow_plan(
    sampler: str, steps: int, strength: float, t_enc: int, karras: bool, schedule_type: str | None, model_sampling: ModelSampling
) -> SamplingPlan:
    """A k-sampler over a flow model's own shifted grid; what needs a DDPM table or VE noise is refused."""
    choices = ", ".join(_FLOW_SAMPLERS)
    if sampler in _COMPVIS:
        raise FieldError.about("sampler", f"{sampler}: DDIM/PLMS need an eps/v schedule; this is a flow model, choose one of {choices}")
    if sampler in _STOCHASTIC:
        raise FieldError.about("sampler", f"{sampler} adds noise by the eps/v rule, not a flow model's; choose one of {choices}")
    if karras or schedule_type not in (None, DEFAULT_SCHEDULE_TYPE, "automatic"):
        raise FieldError.about("schedule", "must stay at its default: a flow model samples on its own shifted schedule")
    # img2img skips the first steps as diffusers' flow img2img pipelines round them (`get_timesteps`), not CompVis'
    start = min(int(max(steps - steps * strength, 0)), steps)
    sigmas = model_sampling.sigmas(steps)[start:]
    common = dict(sampler=sampler, steps=steps, strength=strength, eta=0.0, karras=False, schedule=None)
    return SamplingPlan(**common, schedule_type=DEFAULT_SCHEDULE_TYPE, sigmas=sigmas, model_sampling=model_sampling)


def step_timesteps(plan: SamplingPlan) -> tuple[float, ...]:
    """The timestep each step starts from, in sampling order (k-samplers: the sigma's fractional timestep)."""
    if plan.sampler in _COMPVIS:
        return tuple(float(step.t) for step in plan.ddim_steps)
    return tuple(plan.model_sampling.timestep(sigma) for sigma in plan.sigmas[: plan.num_steps])


def handover_step(plan: SamplingPlan, switch_at: float) -> int:
    """How many of the plan's steps the first model runs when a second takes over at `switch_at` (0..1) of
    the denoising: the steps starting at a timestep of at least round(T * (1 - switch_at)), T the training
    timesteps. This is diffusers' `denoising_end` cutoff and AUTOMATIC1111's default refiner switch (by
    timestep: completed = (999 - t) / 1000); the steps after it go to the second model."""
    if not 0.0 < switch_at < 1.0:
        raise ValueError(f"a switch must be between 0 and 1 (exclusive), got {switch_at}")
    cutoff = round(plan.model_sampling.num_timesteps * (1.0 - switch_at))
    return sum(1 for t in step_timesteps(plan) if t >= cutoff)


def start_latents(plan: SamplingPlan, noise: Tensor, init_latents: Tensor | None = None) -> Tensor:
    """The x `sample` starts from. txt2img: noise (DDIM/PLMS) or noise * sigma_max (k-samplers).
    img2img: the init latents noised to the plan's first level; unchanged when no step runs."""
    if init_latents is None:
        if plan.strength != 1.0:
            raise ValueError("txt2img needs a plan made with strength 1.0")
        return noise if plan.sampler in _COMPVIS else plan.model_sampling.initial_latents(noise, plan.sigmas[0])
    if plan.num_steps == 0:
        return init_latents
    x0, eps = init_latents.float(), noise.to(init_latents.device, torch.float32)
    if plan.sampler in _COMPVIS:
        a = plan.noise_step.alpha  # CompVis stochastic_encode with the DDIM arrays
        x = math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps
    else:
        x = plan.model_sampling.noise_image(x0, eps, plan.sigmas[0])
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

    `eps_model(x_in, t)` gets x_in in x's dtype and t as float32 [B] and returns the prediction the plan's
    model sampling reads (eps; a flow model's velocity). The sampler state is kept
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
        out = _K_SAMPLERS[plan.sampler](plan.model_sampling.denoiser(eps), state, plan.sigmas, noise, callback)
    return out.to(dtype)


_FLOW_SAMPLERS = tuple(name for name in _K_SAMPLERS if name not in _STOCHASTIC)


def sampler_display_name(sampler: str, karras: bool) -> str:
    """AUTOMATIC1111's name for the sampler (written into image metadata)."""
    check_sampler(sampler)
    return _DISPLAY_NAMES[sampler] + (" Karras" if karras else "")

"""DDIM and PLMS exactly as CompVis `ldm/models/diffusion/ddim.py` / `plms.py`.

Both work on the variance-preserving latents x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with
an eps model `eps(x_t, t)`, over CompVis' uniform DDIM grid (see `schedules.ddim_timesteps`).
Steps are given in sampling order (noisiest first); `callback(i, x, x0)` after step i gets the
x0 predicted from the eps the step used (PLMS: the Adams-Bashforth combination).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from .k_samplers import Noise, StepCallback
from .schedules import DiscreteSchedule, ddim_timesteps

EpsFn = Callable[[Tensor, float], Tensor]


@dataclass(frozen=True)
class DDIMStep:
    """One entry of CompVis' DDIM arrays: timestep, abar_t, abar_prev and the eta noise std."""

    t: int
    alpha: float
    alpha_prev: float
    sigma: float


def ddim_grid(schedule: DiscreteSchedule, steps: int, eta: float) -> list[DDIMStep]:
    """CompVis `make_ddim_sampling_parameters`, ascending: alphas = abar[ts], alphas_prev =
    [abar[0]] + abar[ts[:-1]], sigma = eta * sqrt((1 - a_prev)/(1 - a) * (1 - a/a_prev))."""
    ts = ddim_timesteps(steps, schedule.num_timesteps)
    ac = schedule.alphas_cumprod
    grid = []
    for k, t in enumerate(ts):
        a = float(ac[t])
        a_prev = float(ac[0] if k == 0 else ac[ts[k - 1]])
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        grid.append(DDIMStep(int(t), a, a_prev, sigma))
    return grid


def ddim_update(x: Tensor, eps: Tensor, step: DDIMStep, noise: Noise | None) -> tuple[Tensor, Tensor]:
    """x_t -> (x_prev, predicted x0) by Song et al. (2021) eq. 12 (CompVis `get_x_prev_and_pred_x0`)."""
    x0 = (x - math.sqrt(1 - step.alpha) * eps) / math.sqrt(step.alpha)
    direction = math.sqrt(max(1 - step.alpha_prev - step.sigma**2, 0.0)) * eps
    x_prev = math.sqrt(step.alpha_prev) * x0 + direction
    if step.sigma > 0 and noise is not None:
        x_prev = x_prev + step.sigma * noise()
    return x_prev, x0


def sample_ddim(
    eps: EpsFn, x: Tensor, steps: Sequence[DDIMStep], noise: Noise, callback: StepCallback = None
) -> Tensor:
    """DDIM (Song et al. 2021): one eps evaluation per step, eta noise from `noise()`."""
    for i, step in enumerate(steps):
        x, x0 = ddim_update(x, eps(x, step.t), step, noise)
        if callback is not None:
            callback(i + 1, x, x0)
    return x


# Adams-Bashforth weights for [e_t, e_{t+1}, ...], newest first (Liu et al. 2022, PNDM eq. 12).
_ADAMS_BASHFORTH = {
    1: (3 / 2, -1 / 2),
    2: (23 / 12, -16 / 12, 5 / 12),
    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def sample_plms(
    eps: EpsFn, x: Tensor, steps: Sequence[DDIMStep], noise: Noise, callback: StepCallback = None
) -> Tensor:
    """PLMS (Liu et al. 2022): CompVis' pseudo improved Euler first step (one extra eps evaluation
    at the next timestep), then 2nd/3rd/4th-order Adams-Bashforth on the stored eps list."""
    old: list[Tensor] = []  # eps of earlier steps, newest first, at most 3
    for i, step in enumerate(steps):
        e_t = eps(x, step.t)
        if not old:
            x_next, _ = ddim_update(x, e_t, step, None)
            e_prime = (e_t + eps(x_next, steps[min(i + 1, len(steps) - 1)].t)) / 2
        else:
            weights = _ADAMS_BASHFORTH[len(old)]
            e_prime = sum(w * e for w, e in zip(weights, [e_t] + old))
        x, x0 = ddim_update(x, e_prime, step, None)
        old = [e_t] + old[:2]
        if callback is not None:
            callback(i + 1, x, x0)
    return x

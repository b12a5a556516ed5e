"""AUTOMATIC1111's schedule types against k-diffusion's formulas, restated here in torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optimized_sd.errors import UserError
from optimized_sd.sampling.plan import SCHEDULE_TYPES, make_plan, schedule_display_name
from optimized_sd.sampling.schedules import scaled_linear_schedule


def kdiffusion_sigmas() -> torch.Tensor:
    """k-diffusion's CompVisDenoiser.sigmas for SD's scaled-linear betas, in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion DiscreteSchedule.t_to_sigma: floor/ceil and frac, interpolating log sigma."""
    log_sigmas = sigmas.log()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion DiscreteSchedule.sigma_to_t (log-sigma interpolation between neighbours)."""
    log_sigmas = sigmas.log()
    dists = sigma.log() - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - sigma.log()) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def append_zero(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x] + [0.0]


@pytest.mark.parametrize("steps", [1, 7, 20])
def test_schedule_types_match_kdiffusion_formulas(steps: int) -> None:
    sigmas = kdiffusion_sigmas()
    smin, smax = float(sigmas[0]), float(sigmas[-1])
    expected = {
        "uniform": append_zero(t_to_sigma(torch.linspace(999, 0, steps, dtype=torch.float64), sigmas)),
        "karras": append_zero(
            (smax ** (1 / 7) + torch.linspace(0, 1, steps, dtype=torch.float64) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
        ),
        "exponential": append_zero(torch.linspace(math.log(smax), math.log(smin), steps, dtype=torch.float64).exp()),
        "sgm_uniform": append_zero(
            t_to_sigma(
                torch.linspace(
                    float(sigma_to_t(torch.tensor([smax], dtype=torch.float64), sigmas)),
                    float(sigma_to_t(torch.tensor([smin], dtype=torch.float64), sigmas)),
                    steps + 1,
                    dtype=torch.float64,
                )[:-1],
                sigmas,
            )
        ),
    }
    for name, want in expected.items():
        got = make_plan("euler", steps, schedule_type=name).sigmas
        assert len(got) == steps + 1, name
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=name)
    assert make_plan("euler", steps, karras=True).sigmas == make_plan("euler", steps, schedule_type="karras").sigmas


def test_sgm_uniform_differs_from_uniform() -> None:
    """SGM Uniform drops the last of steps+1 points instead of ending at sigma_min."""
    uniform, sgm = make_plan("euler", 10, schedule_type="uniform").sigmas, make_plan("euler", 10, schedule_type="sgm_uniform").sigmas
    assert uniform[0] == pytest.approx(sgm[0])
    assert uniform[-2] == pytest.approx(scaled_linear_schedule().sigma_min)
    assert sgm[-2] > uniform[-2] * 5


def test_automatic_is_the_samplers_default_in_automatic1111() -> None:
    assert make_plan("dpmpp_2m", 8, schedule_type="automatic").schedule_type == "karras"
    assert make_plan("dpmpp_2m_sde", 8, schedule_type="automatic").schedule_type == "exponential"
    assert make_plan("euler_a", 8, schedule_type="automatic").schedule_type == "uniform"
    assert make_plan("euler", 8).schedule_type == "linspace"  # the default stays diffusers' spacing
    assert schedule_display_name("sgm_uniform") == "SGM Uniform"
    assert "automatic" in SCHEDULE_TYPES


def test_img2img_runs_the_tail_of_the_chosen_grid() -> None:
    full = make_plan("euler", 10, schedule_type="exponential").sigmas
    assert make_plan("euler", 10, strength=0.5, schedule_type="exponential").sigmas == full[5:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampler="euler", schedule_type="cosine"), "schedule .cosine. is unknown"),
        (dict(sampler="euler", schedule_type="uniform", karras=True), "karras"),
        (dict(sampler="ddim", schedule_type="karras"), "does not apply to ddim"),
    ],
)
def test_bad_schedule_types(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_plan(steps=10, **kwargs)

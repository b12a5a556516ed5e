"""The model-sampling objects: flow matching against diffusers' FlowMatchEulerDiscreteScheduler, and the
eps/v objects against the discrete denoisers the samplers used before them (bit for bit)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler  # test-only dependency: the reference for flow matching
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from optimized_sd.errors import UserError
from optimized_sd.sampling import (
    Conditioning,
    EpsSampling,
    FlowSampling,
    VSampling,
    discrete_sampling,
    flow_mu,
    make_plan,
    prediction_adapter,
    sample,
    scaled_linear_schedule,
    start_latents,
)
from optimized_sd.sampling.denoisers import eps_denoiser
from optimized_sd.sampling.inpainting import noised_to

SHAPE = (2, 4, 8, 8)
STEPS = 8
# (fixed shift, token count for a dynamic shift): SD3-like fixed shifts, Flux-like image sizes (1024 tokens:
# 512x512; 9000 tokens: past the 4096 the line is fitted to, so mu is extrapolated)
SHIFTS = [(1.0, None), (3.0, None), (None, 1024), (None, 9000)]


def randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def flow_pair(shift: float | None, tokens: int | None, steps: int = STEPS) -> tuple[FlowSampling, FlowMatchEulerDiscreteScheduler]:
    """Our flow sampling and diffusers' scheduler, set up alike."""
    if tokens is None:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(steps)
        return FlowSampling(shift=shift), scheduler
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(steps, mu=calculate_shift(tokens))
    return FlowSampling(dynamic=True).at_tokens(tokens), scheduler


class Velocity:
    """A stub flow model: v = a x + b t / 1000 + c, recording the timesteps it is called with."""

    def __init__(self) -> None:
        self.timesteps: list[float] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.timesteps.append(float(t[0]))
        return -0.7 * x + 0.3 * (t / 1000).view(-1, 1, 1, 1) + 0.1


@pytest.mark.parametrize("tokens", [256, 1024, 4096, 9000])
def test_flow_mu_is_diffusers_calculate_shift(tokens):
    assert flow_mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-12)


@pytest.mark.parametrize("shift, tokens", SHIFTS)
def test_flow_sigmas_and_timesteps_are_the_schedulers(shift, tokens):
    sampling, scheduler = flow_pair(shift, tokens)
    plan = make_plan("euler", STEPS, model_sampling=sampling)
    assert plan.sigmas == pytest.approx(scheduler.sigmas.tolist(), abs=1e-6) and plan.sigmas[-1] == 0.0
    assert [sampling.timestep(s) for s in plan.sigmas[:-1]] == pytest.approx(scheduler.timesteps.tolist(), abs=1e-3)


@pytest.mark.parametrize("shift, tokens", SHIFTS)
def test_flow_euler_matches_diffusers_step_by_step(shift, tokens):
    sampling, scheduler = flow_pair(shift, tokens)
    plan = make_plan("euler", STEPS, model_sampling=sampling)
    noise = randn(0)
    ours_model, ours = Velocity(), []
    x = start_latents(plan, noise)
    assert torch.equal(x, noise)  # at sigma 1 the latent is the noise itself
    out = sample(plan, ours_model, x, [torch.Generator() for _ in range(2)], progress=lambda info: ours.append(info.x.clone()))

    theirs_model, theirs, latent = Velocity(), [noise], noise
    for t in scheduler.timesteps:
        latent = scheduler.step(theirs_model(latent, t.expand(2)), t, latent).prev_sample
        theirs.append(latent)
    assert len(ours) == len(theirs) == STEPS + 1
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max().item() < 1e-5, step
    assert torch.equal(out, ours[-1])
    assert ours_model.timesteps == pytest.approx(theirs_model.timesteps, abs=1e-3)  # the model saw the scheduler's timesteps


@pytest.mark.parametrize("shift, tokens", SHIFTS)
def test_flow_noise_image_is_scale_noise(shift, tokens):
    sampling, scheduler = flow_pair(shift, tokens)
    x0, noise = randn(1), randn(2)
    for index in (0, 3, STEPS - 1):
        expected = scheduler.scale_noise(x0, scheduler.timesteps[index : index + 1], noise)
        got = sampling.noise_image(x0, noise, float(scheduler.sigmas[index]))
        assert (got - expected).abs().max().item() < 1e-6


def test_flow_img2img_and_inpaint_noise_by_the_flow_rule():
    sampling = FlowSampling(shift=3.0)
    plan = make_plan("euler", 10, strength=0.6, model_sampling=sampling)
    assert plan.sigmas == make_plan("euler", 10, model_sampling=sampling).sigmas[4:]
    x0, noise = randn(3), randn(4)
    sigma = plan.sigmas[0]
    assert torch.allclose(start_latents(plan, noise, x0), (1 - sigma) * x0 + sigma * noise, atol=1e-6)
    assert torch.allclose(noised_to(plan, 2, x0, noise), (1 - plan.sigmas[2]) * x0 + plan.sigmas[2] * noise, atol=1e-6)


def test_dynamic_shift_needs_mu():
    with pytest.raises(ValueError, match="mu"):
        FlowSampling(dynamic=True).sigmas(4)
    assert FlowSampling(shift=3.0).at_tokens(4096) == FlowSampling(shift=3.0)  # a fixed shift ignores the size


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampler="ddim"), "DDIM/PLMS need an eps/v schedule"),
        (dict(sampler="plms"), "DDIM/PLMS need an eps/v schedule"),
        (dict(sampler="euler_a"), "euler_a adds noise"),
        (dict(sampler="dpmpp_2m_sde"), "dpmpp_2m_sde adds noise"),
        (dict(sampler="euler", karras=True), "own shifted schedule"),
        (dict(sampler="euler", schedule_type="exponential"), "own shifted schedule"),
    ],
)
def test_flow_refuses_what_needs_a_discrete_schedule(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_plan(steps=10, model_sampling=FlowSampling(), **kwargs)


def test_flow_runs_the_deterministic_k_samplers():
    for name in ("euler", "heun", "dpm2", "lms", "dpmpp_2m"):
        plan = make_plan(name, 6, model_sampling=FlowSampling(shift=3.0))
        out = sample(plan, Velocity(), start_latents(plan, randn(0)), [torch.Generator() for _ in range(2)])
        assert torch.isfinite(out).all(), name


# -- eps / v: the objects are the discrete denoisers they replaced --------------------------------------


def toy_eps(x_in: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    return 0.5 * torch.tanh(x_in) + (t / 1000).view(-1, 1, 1, 1)


SIGMAS = (14.6, 3.2, 0.9, 0.03)


def test_eps_sampling_is_the_discrete_eps_denoiser_bit_for_bit():
    schedule = scaled_linear_schedule()
    denoise = EpsSampling(schedule).denoiser(toy_eps)
    for sigma in SIGMAS:
        x = randn(5) * sigma
        c_in = 1.0 / math.sqrt(sigma**2 + 1.0)  # k-diffusion's DiscreteEpsDDPMDenoiser, written out
        expected = x - sigma * toy_eps(x * c_in, schedule.sigma_to_t(sigma))
        assert torch.equal(denoise(x, sigma), expected)
        assert torch.equal(eps_denoiser(toy_eps, schedule)(x, sigma), expected)


def test_v_sampling_is_the_v_adapter_then_eps_bit_for_bit():
    schedule = scaled_linear_schedule()
    sampling = discrete_sampling("v_prediction", schedule)
    assert isinstance(sampling, VSampling) and type(discrete_sampling("epsilon", schedule)) is EpsSampling

    def raw(x, t, cond):  # a stub v model
        return 0.3 * torch.sin(x) - (t / 2000).view(-1, 1, 1, 1)

    cond = Conditioning(torch.zeros(2, 3, 5))

    def call(model):
        return lambda x_in, t: model(x_in, torch.full((2,), float(t)), cond)

    ours = sampling.denoiser(call(sampling.prediction(raw)))
    before = eps_denoiser(call(prediction_adapter(raw, "v_prediction", schedule)), schedule)
    for sigma in SIGMAS:
        x = randn(6) * sigma
        assert torch.equal(ours(x, sigma), before(x, sigma))
        # and it is k-diffusion's v rule: x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(c_in x)
        c_in = 1 / math.sqrt(sigma**2 + 1)
        v = call(raw)(x * c_in, schedule.sigma_to_t(sigma))
        assert torch.allclose(ours(x, sigma), x / (sigma**2 + 1) - sigma * c_in * v, atol=1e-5)
    with pytest.raises(ValueError, match="sample"):
        discrete_sampling("sample", schedule)


def test_discrete_noise_image_and_start_are_the_k_diffusion_rules():
    plan = make_plan("euler", 10, strength=0.5)
    assert isinstance(plan.model_sampling, EpsSampling) and plan.model_sampling.schedule is plan.schedule
    x0, noise = randn(7), randn(8)
    assert torch.equal(start_latents(plan, noise, x0), x0 + noise * plan.sigmas[0])
    assert torch.equal(noised_to(plan, 1, x0, noise), x0 + plan.sigmas[1] * noise)
    full = make_plan("euler", 10)
    assert torch.equal(start_latents(full, noise), noise * full.sigmas[0])

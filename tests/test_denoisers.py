"""Denoiser wrappers, conditioning and the sampler step callback, on toy models (no pipeline)."""

from __future__ import annotations

import math

import diffusers  # test-only dependency: the reference for the v-prediction maths
import pytest
import torch

from optimized_sd.sampling import (
    Conditioning,
    SamplingPlan,
    StepInfo,
    classifier_free_guidance,
    make_plan,
    prediction_adapter,
    sample,
    start_latents,
)
from optimized_sd.sampling.compvis import ddim_update
from optimized_sd.sampling.denoisers import eps_denoiser
from optimized_sd.sampling.k_samplers import sample_euler

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)


def randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def constant(output: torch.Tensor):
    """A model whose raw output is `output` whatever it is given."""
    return lambda x, t, cond: output


NO_COND = Conditioning(torch.zeros(2, 3, 5))


@pytest.mark.parametrize("steps", [10, 25])
def test_v_adapter_matches_diffusers_ddim(steps):
    plan = make_plan("ddim", steps)
    compvis = dict(set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", clip_sample=False)
    scheduler = diffusers.DDIMScheduler(**SD, **compvis, prediction_type="v_prediction")
    scheduler.set_timesteps(steps)
    assert [step.t for step in plan.ddim_steps] == scheduler.timesteps.tolist()
    for index, step in enumerate(plan.ddim_steps):
        x, v = randn(index), randn(100 + index)
        eps = prediction_adapter(constant(v), "v_prediction", plan.schedule)(x, torch.full((2,), float(step.t)), NO_COND)
        ours, _ = ddim_update(x, eps, step, None)
        theirs = scheduler.step(v, step.t, x, eta=0.0).prev_sample
        assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("steps", [8, 20])
def test_v_adapter_matches_diffusers_euler(steps):
    plan = make_plan("euler", steps)
    scheduler = diffusers.EulerDiscreteScheduler(**SD, prediction_type="v_prediction")
    scheduler.set_timesteps(steps)
    for index in range(steps):
        sigma, sigma_next = plan.sigmas[index], plan.sigmas[index + 1]
        x, v = randn(index) * sigma, randn(100 + index)
        model = prediction_adapter(constant(v), "v_prediction", plan.schedule)
        eps = lambda x_in, t, model=model: model(x_in, torch.full((2,), float(t)), NO_COND)  # noqa: E731
        ours = sample_euler(eps_denoiser(eps, plan.schedule), x, [sigma, sigma_next], noise=None)
        theirs = scheduler.step(v, scheduler.timesteps[index], x).prev_sample
        assert (ours - theirs).abs().max().item() < 1e-4 * max(1.0, sigma)


def test_eps_adapter_is_the_model_and_unknown_types_are_refused():
    plan = make_plan("ddim", 10)
    out = randn(3)
    assert prediction_adapter(constant(out), "epsilon", plan.schedule)(randn(1), torch.ones(2), NO_COND) is out
    with pytest.raises(ValueError, match="sample"):
        prediction_adapter(constant(out), "sample", plan.schedule)


def test_alphas_cumprod_at_inverts_sigma_to_t():
    schedule = make_plan("ddim", 10).schedule
    whole = torch.tensor([0.0, 1.0, 500.0, 999.0])
    expected = torch.tensor(schedule.alphas_cumprod[[0, 1, 500, 999]])
    assert torch.allclose(schedule.alphas_cumprod_at(whole), expected, rtol=1e-12)
    for sigma in (0.05, 1.3, 7.7, 14.0):
        t = torch.tensor([schedule.sigma_to_t(sigma)], dtype=torch.float64)
        assert schedule.alphas_cumprod_at(t).item() == pytest.approx(1 / (sigma**2 + 1), rel=1e-9)


class Recorder:
    """A model that records what it is called with; its output depends on x, t and the context."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, Conditioning]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.calls.append((x, t, cond))
        y = 0.0 if cond.y is None else cond.y.sum(1).view(-1, 1, 1, 1)
        return torch.tanh(x) * cond.context.mean((1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000 + y


def test_cfg_wrapper_equals_the_guidance_formula():
    cond = Conditioning(randn(1, (2, 7, 5)), y=randn(2, (2, 3)))
    uncond = Conditioning(randn(3, (1, 7, 5)), y=randn(4, (1, 3))).repeat(2)
    model = Recorder()
    x, t, scale = randn(5), torch.tensor([10.0, 10.0]), 7.5
    guided = classifier_free_guidance(model, cond, uncond, scale)(x, t)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 4  # one batched call: uncond then cond
    out_uncond, out_cond = Recorder()(x, t, uncond), Recorder()(x, t, cond)
    assert torch.allclose(guided, out_uncond + scale * (out_cond - out_uncond), atol=1e-6)
    unguided = classifier_free_guidance(model, cond, None, scale)(x, t)
    assert torch.equal(unguided, Recorder()(x, t, cond))


def test_conditioning_cat_and_repeat():
    one = Conditioning(randn(1, (1, 77, 8)))
    two = one.repeat(2)
    assert two.context.shape == (2, 77, 8) and torch.equal(two.context[1], one.context[0])
    both = two.cat(Conditioning(randn(2, (3, 77, 8))))
    assert both.batch == 5 and both.y is None
    with pytest.raises(ValueError):
        two.cat(Conditioning(randn(2, (2, 77, 8)), y=torch.zeros(2, 4)))
    with pytest.raises(ValueError):
        Conditioning(randn(1, (2, 77, 8)), y=torch.zeros(3, 4))


def toy_eps(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.tanh(x_in) + (t / 1000).view(-1, 1, 1, 1)


def run_with_steps(name: str, steps: int) -> tuple[list[StepInfo], torch.Tensor, SamplingPlan]:
    plan = make_plan(name, steps)
    seen: list[StepInfo] = []
    x = start_latents(plan, randn(0))
    out = sample(plan, toy_eps, x, [torch.Generator().manual_seed(s) for s in (1, 2)], progress=seen.append)
    return seen, out, plan




def test_callback_sees_x_and_the_denoised_estimate_euler():
    seen, out, plan = run_with_steps("euler", 5)
    assert [info.step for info in seen] == list(range(6)) and seen[0].denoised is None
    for before, after in zip(seen, seen[1:]):
        sigma, sigma_next = plan.sigmas[before.step], plan.sigmas[after.step]
        # Euler moves x along (x - denoised) / sigma: the denoised estimate is the one the step used
        expected = before.x + (before.x - after.denoised) / sigma * (sigma_next - sigma)
        assert torch.allclose(after.x, expected, atol=1e-6)
        recomputed = before.x - sigma * toy_eps(before.x / math.sqrt(sigma**2 + 1), torch.full((2,), plan.schedule.sigma_to_t(sigma)))
        assert torch.allclose(after.denoised, recomputed, atol=1e-6)
    assert torch.equal(seen[-1].x, out) and torch.allclose(out, seen[-1].denoised)  # the last step lands on x0


def test_callback_sees_x_and_the_denoised_estimate_ddim():
    seen, out, plan = run_with_steps("ddim", 10)
    for before, after, step in zip(seen, seen[1:], plan.ddim_steps):
        eps = toy_eps(before.x, torch.full((2,), float(step.t)))
        assert torch.allclose(after.denoised, (before.x - math.sqrt(1 - step.alpha) * eps) / math.sqrt(step.alpha), atol=1e-5)
        assert torch.allclose(after.x, math.sqrt(step.alpha_prev) * after.denoised + math.sqrt(1 - step.alpha_prev) * eps, atol=1e-5)
    assert torch.equal(seen[-1].x, out)


def test_callback_may_stop_sampling():
    class Stop(Exception):
        pass

    plan = make_plan("plms", 10)
    calls = []

    def eps(x_in, t):
        calls.append(t)
        return toy_eps(x_in, t)

    def progress(info: StepInfo) -> None:
        if info.step == 2:
            raise Stop

    with pytest.raises(Stop):
        sample(plan, eps, start_latents(plan, randn(0)), [torch.Generator() for _ in range(2)], progress=progress)
    assert len(calls) == 3  # PLMS: two evaluations in its first step, one in its second, then stopped

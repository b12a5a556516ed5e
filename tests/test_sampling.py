"""Samplers against diffusers' own scheduler loops, on a toy eps model.

Every sampler is run through `make_plan` / `start_latents` / `sample` and compared with the
diffusers scheduler that implements the same method, driven by diffusers' own
`set_timesteps` / `scale_model_input` / `step` loop with the same eps model and the same start.
Where diffusers draws noise (ancestral, SDE, DDIM eta) it gets the same per-image CPU
generators, so the draws coincide; where it would use a Brownian tree (DPMSolverSDEScheduler)
its noise sampler is replaced by the same Gaussian draws.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import math
import re
import sys
import types
from collections.abc import Callable

import diffusers  # test-only dependency: the reference we compare against
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from optimized_sd.errors import UserError
from optimized_sd.sampling import (
    SAMPLERS,
    make_plan,
    sample,
    sampler_display_name,
    scaled_linear_schedule,
    start_latents,
)


def _dpm_solver_sde_scheduler() -> type:
    """diffusers' DPMSolverSDEScheduler; its module imports torchsde for the Brownian tree that we
    replace with Gaussian draws, so without torchsde it is imported against an empty stand-in."""
    name = "diffusers.schedulers.scheduling_dpmsolver_sde"
    if importlib.util.find_spec("torchsde") is not None:
        return importlib.import_module(name).DPMSolverSDEScheduler
    stub = types.ModuleType("torchsde")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchsde", None)
    sys.modules["torchsde"] = stub
    try:
        return importlib.import_module(name).DPMSolverSDEScheduler
    finally:
        del sys.modules["torchsde"]


TOL = 1e-4
SHAPE = (2, 4, 8, 8)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
COMPVIS = dict(set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


class ToyEps:
    """A fixed, seeded eps model: 3x3 conv + tanh with a t-dependent term; images independent."""

    def __init__(self, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(4, 4, 3, 3, generator=g) * 0.15
        self.t_bias = torch.randn(1, 4, 1, 1, generator=g)
        self.dtypes: list[torch.dtype] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        assert float(t.min()) >= 0 and float(t.max()) <= 999
        self.dtypes.append(x.dtype)
        tt = (t.to(torch.float32) / 1000).view(-1, 1, 1, 1).to(x.device)
        xf = x.float()
        h = F.conv2d(xf, self.weight.to(x.device), padding=1)
        return (0.6 * torch.tanh(h + self.t_bias.to(x.device) * torch.cos(3 * tt)) + 0.4 * xf * tt).to(x.dtype)


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def noise(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def ours(name: str, steps: int, x: torch.Tensor | None = None, seeds=(7, 8), init=None, **kw) -> torch.Tensor:
    plan = make_plan(name, steps, **kw)
    x = start_latents(plan, noise() if x is None else x, init)
    return sample(plan, ToyEps(), x, gens(*seeds))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# --- diffusers side ---------------------------------------------------------------------------


def _log_sigmas(sched) -> np.ndarray:
    ac = sched.alphas_cumprod.numpy().astype(np.float64)
    return np.log(np.sqrt((1 - ac) / ac))


def unround_timesteps(positions: Callable[[int], range]) -> Callable:
    """KDPM2(Ancestral) and DPMSolverMultistep round Karras timesteps to integers (a diffusers quirk
    that k-diffusion and A1111 do not have); put back the exact t of each sigma at `positions`."""

    def fix(sched) -> None:
        ts = sched.timesteps.to(torch.float64).clone()
        for j in positions(len(ts)):
            ts[j] = float(sched._sigma_to_t(np.array(float(sched.sigmas[j])), _log_sigmas(sched)))
        sched.timesteps = ts.to(torch.float32)

    return fix


def karras_grid(sched) -> None:
    """For a scheduler without `use_karras_sigmas` (EulerAncestral): our Karras sigmas (checked
    against diffusers' through the other schedulers) and their timesteps by diffusers' own lookup."""
    sigmas = make_plan("euler", sched.num_inference_steps, karras=True).sigmas
    sched.sigmas = torch.tensor(sigmas, dtype=torch.float32)
    lookup = diffusers.EulerDiscreteScheduler(**SD)  # the class with diffusers' sigma -> t lookup
    t = [float(lookup._sigma_to_t(np.array(s), _log_sigmas(sched))) for s in sigmas[:-1]]
    sched.timesteps = torch.tensor(t, dtype=torch.float32)


def fixed_timesteps(timesteps: list[int]) -> Callable:
    def fix(sched) -> None:
        sched.timesteps = torch.as_tensor(timesteps)

    return fix


def gaussian_noise_sampler(generators: list[torch.Generator]) -> Callable:
    """DPMSolverSDEScheduler draws from a Brownian tree; give it our per-image Gaussian draws."""

    def fix(sched) -> None:
        draw = lambda: torch.stack([torch.randn(SHAPE[1:], generator=g) for g in generators])  # noqa: E731
        sched.noise_sampler = lambda sigma, sigma_next: draw()

    return fix


def diffusers_loop(sched, steps, x, *, begin=0, step_kw=None, after_set_timesteps=()):
    """diffusers' own denoising loop; `begin` is a first index as in its img2img pipelines."""
    sched.set_timesteps(steps)
    for fix in after_set_timesteps:
        fix(sched)
    if begin:
        sched.set_begin_index(begin)
    model = ToyEps()
    for t in sched.timesteps[begin:]:
        x_in = sched.scale_model_input(x, t)
        eps = model(x_in, t.expand(x.shape[0]).to(torch.float32))
        x = sched.step(eps, t, x, **(step_kw or {})).prev_sample
    return x


def _every(n: int) -> range:
    return range(n)


def _even(n: int) -> range:
    return range(0, n, 2)


# sampler -> (scheduler class, config, keeps variance-preserving x, timesteps it rounds for Karras)
K_REFS = {
    "euler": (diffusers.EulerDiscreteScheduler, {}, False, None),
    "heun": (diffusers.HeunDiscreteScheduler, {}, False, None),
    "dpm2": (diffusers.KDPM2DiscreteScheduler, {}, False, _even),
    "lms": (diffusers.LMSDiscreteScheduler, {}, False, None),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++"), True, _every),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}, False, None),
    "dpm2_a": (diffusers.KDPM2AncestralDiscreteScheduler, {}, False, _even),
    "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), True, _every),
    "dpmpp_sde": (_dpm_solver_sde_scheduler(), {}, False, None),
}
DETERMINISTIC = ("euler", "heun", "dpm2", "lms", "dpmpp_2m")
STOCHASTIC = ("euler_a", "dpm2_a", "dpmpp_2m_sde", "dpmpp_sde")


def diffusers_k(name: str, steps: int, karras: bool, x_start: torch.Tensor, seeds=(7, 8), begin=0, rounding=False):
    """Run the diffusers scheduler of k-sampler `name` from our start latents `x_start`."""
    if name == "lms":
        pytest.importorskip("scipy")  # diffusers' LMS integrates its coefficients with scipy
    cls, extra, vp, rounded = K_REFS[name]
    if name == "dpmpp_2m_sde" or name == "dpmpp_2m":
        extra = dict(extra, solver_order=2, solver_type="midpoint")
    has_karras = "use_karras_sigmas" in inspect.signature(cls.__init__).parameters
    sched = cls(**SD, **extra, **({"use_karras_sigmas": karras} if has_karras else {}))
    generators = gens(*seeds)
    fixes: list[Callable] = []
    if karras and not has_karras:
        fixes.append(karras_grid)
    if karras and rounded is not None and not rounding:
        fixes.append(unround_timesteps(rounded))
    if name == "dpmpp_sde":
        fixes.append(gaussian_noise_sampler(generators))
    step_kw = {"generator": generators} if name in ("euler_a", "dpm2_a", "dpmpp_2m_sde") else {}
    x = x_start
    if vp:  # DPMSolverMultistep steps the variance-preserving x: hand it our start in that scale
        sched.set_timesteps(steps)
        for fix in fixes:
            fix(sched)
        x = x_start / math.sqrt(float(sched.sigmas[begin]) ** 2 + 1)
    return diffusers_loop(sched, steps, x, begin=begin, step_kw=step_kw, after_set_timesteps=fixes)


# --- schedule ---------------------------------------------------------------------------------


def test_schedule_matches_diffusers_and_sigma_to_t_inverts():
    sched = scaled_linear_schedule()
    ref = diffusers.DDIMScheduler(**SD).alphas_cumprod.double().numpy()
    assert np.abs(sched.alphas_cumprod - ref).max() < 1e-6
    assert sched.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert sched.sigma_max == pytest.approx(14.6146, abs=1e-3)
    for t in (0, 1, 10, 500, 998, 999):
        assert sched.sigma_to_t(float(sched.sigmas[t])) == pytest.approx(t, abs=1e-9)
    mid = math.exp((sched.log_sigmas[10] + sched.log_sigmas[11]) / 2)
    assert sched.sigma_to_t(mid) == pytest.approx(10.5, abs=1e-9)


def test_karras_and_linspace_grids():
    sched = scaled_linear_schedule()
    plan = make_plan("euler", 12, karras=True)
    assert len(plan.sigmas) == 13 and plan.sigmas[-1] == 0.0
    assert plan.sigmas[0] == pytest.approx(sched.sigma_max) and plan.sigmas[-2] == pytest.approx(sched.sigma_min)
    rho = [s ** (1 / 7) for s in plan.sigmas[:-1]]
    assert np.allclose(np.diff(rho), rho[1] - rho[0])  # equal steps in sigma^(1/rho)
    assert make_plan("euler", 1).sigmas == (pytest.approx(sched.sigma_max), 0.0)


# --- deterministic parity ---------------------------------------------------------------------

@pytest.mark.parametrize("karras", [False, True], ids=["default", "karras"])
@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_k_sampler_matches_diffusers(name, karras):
    steps = 10
    plan = make_plan(name, steps, karras=karras)
    x = start_latents(plan, noise())
    got = sample(plan, ToyEps(), x, gens(7, 8))
    want = diffusers_k(name, steps, karras, x)
    diff = max_diff(got, want)
    assert diff <= TOL, diff
    assert float(got.abs().max()) > 0.1  # not a degenerate all-zero comparison


@pytest.mark.parametrize("steps", [10, 7, 30])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(steps, eta):
    """S=10 uses diffusers' own grid; S=7 and S=30 give CompVis' 8 and 31 steps, so diffusers runs
    with its timesteps replaced by CompVis' grid (its step size 1000 // S is the same)."""
    plan = make_plan("ddim", steps, eta=eta)
    grid = [s.t for s in plan.ddim_steps]
    assert len(grid) == {10: 10, 7: 8, 30: 31}[steps]
    x = start_latents(plan, noise())
    got = sample(plan, ToyEps(), x, gens(7, 8))
    sched = diffusers.DDIMScheduler(**SD, **COMPVIS, clip_sample=False)
    fixes = () if steps == 10 else (fixed_timesteps(grid),)
    want = diffusers_loop(sched, steps, x, step_kw=dict(eta=eta, generator=gens(7, 8)), after_set_timesteps=fixes)
    diff = max_diff(got, want)
    assert diff <= TOL, diff


def _pndm_timesteps(grid: list[int]) -> list[int]:
    """diffusers' PLMS order (skip_prk_steps): the second timestep twice, for the extra evaluation."""
    return grid[:2] + grid[1:] if len(grid) > 1 else grid


@pytest.mark.parametrize("steps", [10, 30])
def test_plms_matches_diffusers_pndm(steps):
    plan = make_plan("plms", steps)
    x = start_latents(plan, noise())
    model = ToyEps()
    got = sample(plan, model, x, gens(7, 8))
    assert len(model.dtypes) == plan.num_steps + 1  # CompVis' extra evaluation on the first step
    sched = diffusers.PNDMScheduler(**SD, **COMPVIS, skip_prk_steps=True)
    grid = [s.t for s in plan.ddim_steps]
    want = diffusers_loop(sched, steps, x, after_set_timesteps=(fixed_timesteps(_pndm_timesteps(grid)),))
    diff = max_diff(got, want)
    assert diff <= TOL, diff


# --- img2img ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "plms"])
@pytest.mark.parametrize("strength", [0.5, 0.75, 1.0])
def test_compvis_img2img_matches_diffusers(name, strength):
    """CompVis: noise to grid[t_enc] with the DDIM arrays, decode over grid[:t_enc] reversed
    (strength 1 runs the whole grid from its noisiest timestep)."""
    steps, init = 10, noise(3)
    plan = make_plan(name, steps, strength=strength)
    x = start_latents(plan, noise(), init)
    got = sample(plan, ToyEps(), x, gens(7, 8))
    t_enc = int(strength * steps)
    grid = [s.t for s in make_plan(name, steps).ddim_steps][::-1]  # ascending
    noised_at = grid[min(t_enc, len(grid) - 1)]
    run = grid[: t_enc if t_enc < steps else len(grid)][::-1]
    cls = diffusers.DDIMScheduler if name == "ddim" else diffusers.PNDMScheduler
    extra = dict(clip_sample=False) if name == "ddim" else dict(skip_prk_steps=True)
    sched = cls(**SD, **COMPVIS, **extra)
    x_ref = sched.add_noise(init, noise(), torch.tensor([noised_at]))
    assert max_diff(x, x_ref) < 1e-5
    timesteps = run if name == "ddim" else _pndm_timesteps(run)
    want = diffusers_loop(sched, steps, x, after_set_timesteps=(fixed_timesteps(timesteps),))
    diff = max_diff(got, want)
    assert diff <= TOL, diff


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "euler_a"])
@pytest.mark.parametrize("karras", [False, True], ids=["default", "karras"])
def test_k_img2img_matches_diffusers_tail(name, karras):
    """k-samplers run the last t_enc intervals of the full schedule from x0 + noise * sigma_start,
    which is diffusers' img2img loop started at index (steps - t_enc) * order."""
    steps, strength, init = 10, 0.6, noise(3)
    plan = make_plan(name, steps, strength=strength, karras=karras)
    x = start_latents(plan, noise(), init)
    got = sample(plan, ToyEps(), x, gens(7, 8))
    t_start = steps - int(strength * steps)
    full = make_plan(name, steps, karras=karras).sigmas
    assert plan.sigmas == full[t_start:]
    order = 2 if name == "heun" else 1
    want = diffusers_k(name, steps, karras, x, begin=t_start * order)
    diff = max_diff(got, want)
    assert diff <= TOL, diff


@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_strengths(name):
    init = noise(3)
    plan0 = make_plan(name, 10, strength=0.0)
    assert plan0.num_steps == 0
    x = start_latents(plan0, noise(), init)
    assert x is init
    assert sample(plan0, ToyEps(), x, gens(7, 8)) is init
    half = make_plan(name, 10, strength=0.5)
    assert half.num_steps == 5
    out = sample(half, ToyEps(), start_latents(half, noise(), init), gens(7, 8))
    assert torch.isfinite(out).all() and max_diff(out, init) > 1e-3
    full = make_plan(name, 10, strength=1.0)
    assert full.num_steps == 10
    out = sample(full, ToyEps(), start_latents(full, noise(), init), gens(7, 8))
    assert torch.isfinite(out).all()


# --- randomness -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STOCHASTIC + ("ddim",))
def test_seeds_reproduce_and_batch_equals_singles(name):
    kw = dict(eta=1.0) if name == "ddim" else {}
    a = ours(name, 8, seeds=(5, 6), **kw)
    assert torch.equal(a, ours(name, 8, seeds=(5, 6), **kw))
    assert max_diff(a, ours(name, 8, seeds=(9, 6), **kw)[:1]) > 1e-2  # image 0 follows its seed
    b = ours(name, 8, seeds=(9, 6), **kw)
    assert torch.equal(a[1], b[1])  # image 1 unaffected by image 0's seed
    x = noise()
    first = ours(name, 8, x=x[:1], seeds=(5,), **kw)
    second = ours(name, 8, x=x[1:], seeds=(6,), **kw)
    assert max_diff(a, torch.cat([first, second])) < 1e-5


@pytest.mark.parametrize("name", DETERMINISTIC + ("plms",))
def test_deterministic_ignores_generators(name):
    assert torch.equal(ours(name, 6, seeds=(1, 2)), ours(name, 6, seeds=(3, 4)))


@pytest.mark.parametrize("name", STOCHASTIC + ("ddim",))
def test_gaussian_data_gets_its_variance(name):
    """Statistical check of the injected noise: with the exact denoiser of N(0, s^2) data, the
    ancestral/SDE samplers (and DDIM with eta 1) must return samples of std s. 200 steps keep the
    discretisation bias under ~3%; 8192 values give ~1% sampling error; a wrong noise scale
    (e.g. sigma_up off by sqrt 2) moves the std by far more than the 4% allowed."""
    s, steps, batch = 0.5, 200, 32
    sched = scaled_linear_schedule()

    def exact_eps(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = float(np.exp(np.interp(float(t[0]), np.arange(1000), sched.log_sigmas)))
        x = x_in * math.sqrt(sigma**2 + 1)
        return (x - x * s**2 / (s**2 + sigma**2)) / sigma

    plan = make_plan(name, steps, **(dict(eta=1.0) if name == "ddim" else dict(karras=True)))
    x = start_latents(plan, noise(11, (batch, *SHAPE[1:])))
    out = sample(plan, exact_eps, x, gens(*range(100, 100 + batch)))
    assert abs(float(out.std()) / s - 1) < 0.04, float(out.std())
    assert abs(float(out.mean())) < 0.03


# --- API details ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampler="k_euler", steps=10), "sampler 'k_euler' is unknown; choose one of: ddim, plms, euler"),
        (dict(sampler="ddim", steps=10, karras=True), "karras sigmas do not apply to ddim"),
        (dict(sampler="plms", steps=10, karras=True), "karras sigmas do not apply to plms"),
        (dict(sampler="plms", steps=10, eta=0.5), "plms supports eta 0 only"),
        (dict(sampler="euler", steps=0), "steps must be a whole number from 1 to 1000, got 0"),
        (dict(sampler="ddim", steps=-3), "steps must be"),
        (dict(sampler="euler", steps=1001), "steps must be a whole number from 1 to 1000"),
        (dict(sampler="ddim", steps=501), "ddim supports at most 500 steps"),
        (dict(sampler="euler", steps=10, strength=1.5), "strength must be between 0 and 1, got 1.5"),
        (dict(sampler="euler", steps=10, strength=-0.1), "strength must be between 0 and 1"),
        (dict(sampler="euler", steps=10, strength=float("nan")), "strength must be between 0 and 1"),
        (dict(sampler="ddim", steps=10, eta=2.0), "eta must be between 0 and 1"),
        (dict(sampler="euler_a", steps=10, eta=0.5), "eta applies to the ddim sampler only"),
    ],
)
def test_bad_inputs_raise_user_error(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        make_plan(kwargs.pop("sampler"), kwargs.pop("steps"), **kwargs)


def test_display_names():
    assert [sampler_display_name(s, False) for s in SAMPLERS] == [
        "DDIM", "PLMS", "Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
    ]  # fmt: skip
    assert sampler_display_name("dpmpp_2m", True) == "DPM++ 2M Karras"
    with pytest.raises(UserError):
        sampler_display_name("nope", False)


def test_progress_counts_steps():
    for name, steps in (("heun", 6), ("ddim", 30), ("plms", 5)):
        seen: list[tuple[int, int]] = []
        plan = make_plan(name, steps)
        x = start_latents(plan, noise())
        sample(plan, ToyEps(), x, gens(1, 2), progress=lambda info, seen=seen: seen.append((info.step, info.total)))
        assert seen == [(i, plan.num_steps) for i in range(0, plan.num_steps + 1)]


@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2m", "dpmpp_sde"])
def test_fp16_model_gets_fp16_and_tracks_fp32(name):
    plan = make_plan(name, 10)
    x = start_latents(plan, noise())
    ref = sample(plan, ToyEps(), x, gens(7, 8))
    model = ToyEps()
    out = sample(plan, model, x.half(), gens(7, 8))
    assert out.dtype == torch.float16 and set(model.dtypes) == {torch.float16}
    assert max_diff(out, ref) < 2e-2 * float(ref.abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["euler_a", "dpmpp_sde", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_cpu_for_the_same_seed(name, dtype):
    kw = dict(eta=1.0) if name == "ddim" else {}
    plan = make_plan(name, 10, **kw)
    x = start_latents(plan, noise())
    ref = sample(plan, ToyEps(), x, gens(7, 8))
    out = sample(plan, ToyEps(), x.to("cuda", dtype), gens(7, 8))
    assert out.device.type == "cuda" and out.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert max_diff(out.cpu(), ref) < tol * float(ref.abs().max())



@pytest.mark.parametrize("steps", [3, 9, 333])
def test_ddim_grid_never_reaches_timestep_1000(steps: int) -> None:
    """CompVis' grid hits t=1000 for these step counts and crashes; ours drops that entry."""
    from optimized_sd.sampling.schedules import ddim_timesteps

    grid = ddim_timesteps(steps)
    assert grid.max() < 1000 and len(grid) == steps
    assert make_plan("ddim", steps).num_steps == steps

"""k-diffusion style samplers: pure functions over a denoiser D(x, sigma) -> x0 and a sigma grid.

x is the variance-exploding state x0 + sigma * eps (Karras et al. 2022), held in float32; sigmas
are Python floats from high to low ending in 0. Every sampler has the signature
`sampler(denoise, x, sigmas, noise, callback) -> x`, where `noise()` returns a fresh N(0, I)
draw shaped like x (only the ancestral/SDE samplers call it) and `callback(i, x, x0)` is told after
each completed step i (1-based) the new x and the denoised estimate x0 that step moved towards (the
first D evaluation of the step, as k-diffusion's callback).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor

Denoiser = Callable[[Tensor, float], Tensor]
Noise = Callable[[], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None] | None
Move = Callable[[Denoiser, Tensor, float, float, Tensor], Tensor]


def _derivative(x: Tensor, sigma: float, x0: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 4 with sigma(t) = t)."""
    return (x - x0) / sigma


def ancestral_split(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split sigma_from -> sigma_to into a deterministic move to sigma_down plus fresh noise of
    std sigma_up (sigma_down^2 + sigma_up^2 = sigma_to^2); eta=1 is the DDPM posterior variance."""
    if sigma_to == 0:
        return 0.0, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


# --- one deterministic move sigma -> sigma_to, given x0 = D(x, sigma) -------------------------


def _euler_move(denoise: Denoiser, x: Tensor, sigma: float, sigma_to: float, x0: Tensor) -> Tensor:
    """First-order step (Karras et al. 2022, Alg. 1 without the correction)."""
    return x + _derivative(x, sigma, x0) * (sigma_to - sigma)


def _heun_move(denoise: Denoiser, x: Tensor, sigma: float, sigma_to: float, x0: Tensor) -> Tensor:
    """Heun's second-order step (Karras et al. 2022, Alg. 1); Euler into sigma = 0."""
    d = _derivative(x, sigma, x0)
    x_next = x + d * (sigma_to - sigma)
    if sigma_to == 0:
        return x_next
    d_next = _derivative(x_next, sigma_to, denoise(x_next, sigma_to))
    return x + (d + d_next) / 2 * (sigma_to - sigma)


def _dpm2_move(denoise: Denoiser, x: Tensor, sigma: float, sigma_to: float, x0: Tensor) -> Tensor:
    """Midpoint step with the midpoint in log sigma, as DPM-Solver-2 (Lu et al. 2022a) and
    diffusers' KDPM2; Euler into sigma = 0."""
    if sigma_to == 0:
        return _euler_move(denoise, x, sigma, sigma_to, x0)
    sigma_mid = math.sqrt(sigma * sigma_to)
    x_mid = x + _derivative(x, sigma, x0) * (sigma_mid - sigma)
    return x + _derivative(x_mid, sigma_mid, denoise(x_mid, sigma_mid)) * (sigma_to - sigma)


def _single_step(move: Move, ancestral: bool) -> Callable[..., Tensor]:
    """A sampler that applies `move` on each interval; the ancestral variant moves to sigma_down
    and then adds sigma_up of fresh noise (k-diffusion's euler_a / dpm2_a)."""

    def sampler(
        denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: Noise, callback: StepCallback = None
    ) -> Tensor:
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            down, up = ancestral_split(sigma, sigma_next) if ancestral else (sigma_next, 0.0)
            x0 = denoise(x, sigma)
            x = move(denoise, x, sigma, down, x0)
            if up > 0:
                x = x + noise() * up
            if callback is not None:
                callback(i + 1, x, x0)
        return x

    return sampler


sample_euler = _single_step(_euler_move, ancestral=False)
sample_euler_ancestral = _single_step(_euler_move, ancestral=True)
sample_heun = _single_step(_heun_move, ancestral=False)
sample_dpm2 = _single_step(_dpm2_move, ancestral=False)
sample_dpm2_ancestral = _single_step(_dpm2_move, ancestral=True)


# --- multistep --------------------------------------------------------------------------------


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Linear multistep weights for step i: the integral over [sigma_i, sigma_{i+1}] of each
    Lagrange basis polynomial through sigma_i, sigma_{i-1}, ... (Gauss-Legendre, exact here)."""
    nodes, weights = np.polynomial.legendre.leggauss(4)  # exact for degree <= 7 >= order - 1
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    pts = [sigmas[i - k] for k in range(order)]
    coeffs = []
    for j in range(order):
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis *= (tau - pts[k]) / (pts[j] - pts[k])
        coeffs.append(float((b - a) / 2 * np.dot(weights, basis)))
    return coeffs


def sample_lms(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Sequence[float],
    noise: Noise,
    callback: StepCallback = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) over the last `order` derivatives (k-diffusion)."""
    history: list[Tensor] = []  # newest first
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        history = [_derivative(x, sigmas[i], x0)] + history[: order - 1]
        coeffs = lms_coefficients(sigmas, i, len(history))
        x = x + sum(c * d for c, d in zip(coeffs, history))
        if callback is not None:
            callback(i + 1, x, x0)
    return x


def _dpmpp_2m(
    denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: Noise, callback: StepCallback, eta: float
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in k-diffusion's form; eta > 0 gives the SDE
    variant with the midpoint correction (eta=0 reduces exactly to the ODE solver)."""
    old_x0: Tensor | None = None
    h_last = 0.0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma)
        if sigma_next == 0:
            x = x0  # the exponential integrator lands exactly on the denoised estimate
        else:
            h = math.log(sigma / sigma_next)  # step in lambda = -log sigma
            phi = -math.expm1(-h - eta * h)
            x = (sigma_next / sigma) * math.exp(-eta * h) * x + phi * x0
            if old_x0 is not None:
                x = x + (0.5 * phi * h / h_last) * (x0 - old_x0)
            if eta:
                x = x + noise() * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)))
            h_last = h
        old_x0 = x0
        if callback is not None:
            callback(i + 1, x, x0)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: Noise, callback: StepCallback = None
) -> Tensor:
    return _dpmpp_2m(denoise, x, sigmas, noise, callback, eta=0.0)


def sample_dpmpp_2m_sde(
    denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: Noise, callback: StepCallback = None
) -> Tensor:
    return _dpmpp_2m(denoise, x, sigmas, noise, callback, eta=1.0)


def sample_dpmpp_sde(
    denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: Noise, callback: StepCallback = None
) -> Tensor:
    """Stochastic DPM-Solver++ (2S, r = 1/2, eta = 1) as k-diffusion's dpmpp_sde: an ancestral
    half step to the log-sigma midpoint, then an ancestral full step using the midpoint's x0
    (with r = 1/2 the blend (1 - 1/2r) x0 + (1/2r) x0_mid is x0_mid). Euler into sigma = 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma)
        if sigma_next == 0:
            x = _euler_move(denoise, x, sigma, sigma_next, x0)
        else:
            sigma_mid = math.sqrt(sigma * sigma_next)
            down, up = ancestral_split(sigma, sigma_mid)
            x_mid = (down / sigma) * x + (1 - down / sigma) * x0 + noise() * up
            x0_mid = denoise(x_mid, sigma_mid)
            down, up = ancestral_split(sigma, sigma_next)
            x = (down / sigma) * x + (1 - down / sigma) * x0_mid + noise() * up
        if callback is not None:
            callback(i + 1, x, x0)
    return x

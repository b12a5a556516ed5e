"""The planner's Flux constants: measured per image token (`TokenActivations` in the family record, from
`benchmarks/calibrate.py --flux`), read through the footprint for a Flux model, and the meter that measures them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from optimized_sd.benchmark.activations import LiveTensorMeter, measure_flux_activations
from optimized_sd.families.flux import FLUX_ACTIVATIONS, FLUX_DEV_RECORD, FLUX_SCHNELL_RECORD
from optimized_sd.memory.planner import Request, TokenActivations, estimate_peak, unet_activation_bytes
from optimized_sd.models.flux import Flux, FluxConfig
from optimized_sd.models.ops import default_init
from optimized_sd.pipelines.placement import footprint

TINY = FluxConfig(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, mlp_hidden=256, context_in_dim=32, vec_in_dim=16)


def test_flux_records_carry_per_token_constants_and_the_planner_uses_them(tmp_path):
    from tests.test_flux_pipeline import build

    assert FLUX_DEV_RECORD.unet_activations is FLUX_SCHNELL_RECORD.unet_activations is FLUX_ACTIVATIONS
    assert isinstance(FLUX_ACTIVATIONS, TokenActivations) and FLUX_ACTIVATIONS.patch == 2
    pipe = build(tmp_path / "dev", "dev").load()
    sizes = footprint(pipe.model, 2, pipe.storage)
    assert sizes.family == "flux-dev" and sizes.unet_constants is FLUX_ACTIVATIONS
    # 1024x1024, one pass per step (scale 1): 4096 image tokens of 2x2 latent pixels, each per_token elements of 2 bytes
    request = Request(1024, 1024, guidance=False)
    assert unet_activation_bytes(request, False, sizes.unet_constants) == FLUX_ACTIVATIONS.per_token * 4096 * 2
    doubled = TokenActivations(FLUX_ACTIVATIONS.per_token * 2)
    from dataclasses import replace

    full = estimate_peak("full", sizes, request, vae_tiling=True)
    more = estimate_peak("full", replace(sizes, activations=doubled), request, vae_tiling=True)
    assert more - full == FLUX_ACTIVATIONS.per_token * 4096 * 2


def test_meter_counts_live_tensors_once_and_not_the_inputs():
    x = torch.randn(100, 100)
    meter = LiveTensorMeter([x])
    with meter:
        y = x @ x  # 40,000 bytes
        z = y + 1
        view = z[:10]  # no new storage
        del y
        w = z * 2
        w.add_(1)  # in place: the same storage
    assert meter.peak == 2 * 40_000 and meter.bytes == 2 * 40_000
    del view


def test_flux_measure_grows_with_tokens_and_calibrate_prints_the_constant(capsys):
    torch.manual_seed(0)
    model = default_init(Flux(TINY)).eval()
    measure = measure_flux_activations(model, [16, 64], 8)
    assert list(measure.peaks) == [16, 64] and measure.peaks[64] > measure.peaks[16] > 0
    assert measure.per_image_token(4096, 512) == measure.per_joint_token * 4608 / 4096 > TINY.mlp_hidden
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import calibrate

    assert calibrate.main(["--flux", "--width", "64", "--heads", "2", "--tokens", "16", "64", "--text-tokens", "8"]) == 0
    assert "measured suggests TokenActivations(" in capsys.readouterr().out

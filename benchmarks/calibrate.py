#!/usr/bin/env python
"""Suggest the planner's activation constants (optimized_sd/memory/planner.py) from measured CUDA runs.

Reads the results.json of one or more `optimized-sd bench` runs on a GPU (benchmarks/gpu_check.sh
writes one) and, per family and stage, takes activation memory = peak allocated - the weights resident in that
mode, in elements of the compute dtype per latent pixel per image in the UNet micro-batch (UNet) or
per image pixel (VAE). Suggestions are the largest measured value plus 10%, rounded up, since the
planner's estimates are meant as upper bounds.

    .venv/bin/python benchmarks/calibrate.py benchmarks/results/<gpu-folder>/results.json

Transformer families (Flux) take one constant per image token (`planner.TokenActivations`). `--flux` measures it
on any device, the CPU included, without a bench run: a random Flux transformer of the given width with one
double and one single block (activations are freed between blocks, so the depth does not change the peak) is
called at two image sizes, each call's activation peak counted tensor by tensor (`benchmark.activations`); the
slope over tokens, times (image + text tokens) / image tokens at 1024x1024 with dev's 512 T5 tokens, is the
suggestion. The default width is Flux.1's (3072, 24 heads, MLP 12288: 1.9 GB of fp32 weights):

    .venv/bin/python benchmarks/calibrate.py --flux [--width 3072 --heads 24 --dtype float32 --device cpu]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized_sd.benchmark.report import calibration_rows  # noqa: E402
from optimized_sd.benchmark.results import BenchRecord  # noqa: E402
from optimized_sd.memory import planner  # noqa: E402

MARGIN = 1.1


def round_up(value: float, step: int = 100) -> int:
    return int(math.ceil(value * MARGIN / step) * step)


FLUX_IMAGE_TOKENS = 4096  # 1024x1024: the family's default size
FLUX_TEXT_TOKENS = 512  # dev's T5 sequence


def measure_flux(args: list[str]) -> int:
    """`--flux`: the per-image-token constant of a random Flux transformer (see the module docstring)."""
    import argparse

    import torch

    from optimized_sd.benchmark.activations import measure_flux_activations
    from optimized_sd.families.flux import FLUX_DEV_RECORD
    from optimized_sd.models.flux import Flux, FluxConfig
    from optimized_sd.models.ops import default_init

    parser = argparse.ArgumentParser(prog="calibrate.py --flux")
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--tokens", type=int, nargs=2, default=(64, 256), help="image tokens of the two calls")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args(args)
    config = FluxConfig(hidden_size=options.width, num_heads=options.heads, depth=1, depth_single_blocks=1, mlp_hidden=4 * options.width)
    torch.manual_seed(0)
    with torch.device(options.device):
        model = default_init(Flux(config)).to(getattr(torch, options.dtype)).eval()
    measure = measure_flux_activations(model, list(options.tokens), options.text_tokens)
    for tokens, peak in measure.peaks.items():
        print(f"flux width {options.width}: {tokens} image + {measure.text_tokens} text tokens: peak {peak:,} elements")
    per_token = measure.per_image_token(FLUX_IMAGE_TOKENS, FLUX_TEXT_TOKENS)
    now = FLUX_DEV_RECORD.unet_activations
    print(f"{measure.per_joint_token:,.0f} elements per joint token; per image token at 1024x1024: {per_token:,.0f}")
    print(f"{'Flux record unet_activations':<44} now {now}   measured suggests TokenActivations({round_up(per_token)}, 1.0)")
    return 0


def main(paths: list[str]) -> int:
    if paths[:1] == ["--flux"]:
        return measure_flux(paths[1:])
    if not paths:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    rows = []
    for path in paths:
        rows += calibration_rows(BenchRecord.from_json(json.loads(Path(path).read_text())))
    if not rows:
        print("no CUDA runs of ours with per-stage figures in these files", file=sys.stderr)
        return 1
    for row in rows:
        print(
            f"{row.scenario:<32} {row.mode or '-':<7} {row.stage:<11} peak {row.peak_allocated_mib:8,.0f} MiB  "
            f"weights {row.resident_weights_mib:8,.0f} MiB  activations {row.activation_mib:8,.0f} MiB  "
            f"{row.elements_per_pixel:10,.0f} elements/pixel"
        )

    def largest(stage: str, modes: tuple[str, ...] | None = None, family: str | None = None, large: bool | None = None) -> float | None:
        values = [
            r.elements_per_pixel
            for r in rows
            if r.stage == stage
            and (modes is None or r.mode in modes)
            and (family is None or r.family == family)
            and (large is None or (r.image_pixels > planner.VAE_DECODE_LARGE_ABOVE) == large)
        ]
        return max(values) if values else None

    print()
    for family in sorted({r.family for r in rows}):
        unet = largest("unet", ("full", "turbo", "split"), family)
        stream = largest("unet", ("stream",), family)
        now = planner.unet_activations(family)
        if isinstance(now, planner.TokenActivations) and unet:
            # the rows count latent pixels of a CFG pair; Flux runs one pass per step (scale 1): per token = x2 x patch^2
            suggested = round_up(unet * 2 * now.patch**2)
            print(f"{family!r} (per image token)".ljust(44) + f" now {now.per_token:>6}   measured suggests {suggested}")
            continue
        suggested_share = round(min(1.0, stream * MARGIN / unet), 2) if unet and stream else None
        print(
            f"UNET_ACTIVATIONS[{family!r}]".ljust(44)
            + f" now {now.per_latent_pixel:>6}, {now.chunked_ff_share:.2f}   measured suggests "
            + f"{round_up(unet) if unet else '-'}, {suggested_share if suggested_share is not None else '-'}"
        )
    suggestions = {
        "VAE_DECODE_ELEMENTS_PER_PIXEL": largest("vae_decode", large=False),
        "VAE_DECODE_LARGE_ELEMENTS_PER_PIXEL": largest("vae_decode", large=True),
        "VAE_ENCODE_ELEMENTS_PER_PIXEL": largest("vae_encode"),
    }
    for name, value in suggestions.items():
        current = getattr(planner, name, None)
        print(f"{name:<44} now {current!s:>8}   measured suggests {round_up(value) if value else '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

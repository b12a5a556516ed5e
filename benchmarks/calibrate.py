#!/usr/bin/env python
"""Suggest the planner's activation constants (optimized_sd/memory/planner.py) from measured CUDA runs.

Reads the results.json of one or more `optimized-sd bench` runs on a GPU (benchmarks/gpu_check.sh
writes one) and, per family and stage, takes activation memory = peak allocated - the weights resident in that
mode, in elements of the compute dtype per latent pixel per image in the UNet micro-batch (UNet) or
per image pixel (VAE). Suggestions are the largest measured value plus 10%, rounded up, since the
planner's estimates are meant as upper bounds.

    .venv/bin/python benchmarks/calibrate.py benchmarks/results/<gpu-folder>/results.json
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


def main(paths: list[str]) -> int:
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

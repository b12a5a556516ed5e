#!/usr/bin/env python
"""The nearest-x2 upsample convs of SD's UNet and VAE, each timed both ways on one device: upsample then a
3x3 conv, and four 2x2 phase convs at the input's resolution (`models.slabs.NearestUpConv2d`, 4/9 of the
multiply-adds), with the relative difference of the two outputs. `PHASE_CONV_DEVICES` (where the engine
uses the phase convs) follows these figures: measured on the CPU, owed on CUDA (device_run.sh `checks`).

    .venv/bin/python benchmarks/phase_conv.py [--device cpu|cuda] [--size 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized_sd.models import ops, slabs  # noqa: E402


def layers(size: int) -> list[tuple[str, int, int, int]]:
    """(name, batch, channels, input side) of SD 1.x/2.x/SDXL's upsample convs at a `size` image: the
    UNet's (CFG batch 2; SD 1.x widths) from the latent side up, then the VAE decoder's (batch 1)."""
    latent = size // 8
    unet = [("unet 1280", 2, 1280, latent // 8), ("unet 1280", 2, 1280, latent // 4), ("unet 640", 2, 640, latent // 2)]
    vae = [("vae 512", 1, 512, latent), ("vae 512", 1, 512, latent * 2), ("vae 256", 1, 256, latent * 4)]
    return unet + vae


def timed(conv: torch.nn.Module, x: torch.Tensor, repeat: int) -> tuple[float, torch.Tensor]:
    """Fastest of `repeat` calls after a warm-up, synchronised on CUDA."""
    out = conv(x)
    best = float("inf")
    for _ in range(repeat):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = conv(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"# {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else torch.backends.cpu.get_cpu_capability()}, "
          f"{str(dtype).split('.')[-1]}, {args.size}x{args.size} image, torch {torch.__version__}")
    totals = {"upsample then conv": 0.0, "phase convs": 0.0}
    slabs.PHASE_CONV_MIN_PIXELS = 1  # every layer both ways, the small ones included (what sets the threshold)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, batch, channels, side in layers(args.size):
            conv = ops.default_init(slabs.NearestUpConv2d(channels, banded=name.startswith("vae"))).to(device, dtype)
            x = torch.randn(batch, channels, side, side, generator=generator).to(device, dtype)
            seconds = {}
            outputs = {}
            for way, devices in (("upsample then conv", set()), ("phase convs", {device.type})):
                slabs.PHASE_CONV_DEVICES.clear()
                slabs.PHASE_CONV_DEVICES.update(devices)
                seconds[way], outputs[way] = timed(conv, x, args.repeat)
                totals[way] += seconds[way]
            plain, phased = outputs["upsample then conv"].float(), outputs["phase convs"].float()
            error = float((phased - plain).norm() / plain.norm())
            ratio = seconds["phase convs"] / seconds["upsample then conv"]
            print(f"{name:<10} {batch}x{channels}x{side}x{side}  upsample then conv {seconds['upsample then conv']:8.4f} s  "
                  f"phase convs {seconds['phase convs']:8.4f} s  {ratio:5.2f}x  rel.err {error:.1e}", flush=True)
    print(f"all six: phase convs {totals['phase convs']:.4f} s / upsample then conv {totals['upsample then conv']:.4f} s = "
          f"{totals['phase convs'] / totals['upsample then conv']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What a LoRA costs per sampling step in each memory mode: s/step and peak memory with and without a
typical LoRA (rank 32 on every attention projection and feed-forward layer of the UNet, kohya names).

In `stream` the LoRA is merged into each block's copy every time the block arrives, so its cost is
paid every step; in `full`/`turbo` it is merged once when the set changes, so a step costs the same.
Each configuration runs `--repeats` times in one process after a warm-up call; the best UNet-stage
s/step counts (the machine is shared, the minimum is the least disturbed).

    python benchmarks/lora_cost.py [--model tiny|sd15] [--size 64] [--steps 6] [--modes stream turbo full]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optimized_sd  # noqa: E402
from optimized_sd.benchmark.model_cache import ensure_model  # noqa: E402
from optimized_sd.pipelines.diffusion import GenerationRequest  # noqa: E402
from optimized_sd.weights.sources import SafetensorsSource  # noqa: E402

TARGETS = re.compile(r"model\.diffusion_model\.(.*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))\.weight$")


def write_typical_lora(checkpoint: Path, path: Path, rank: int) -> int:
    """A kohya file (LDM-style names) patching every UNet attention and feed-forward linear; returns
    how many layers it patches."""
    from safetensors.torch import save_file

    source = SafetensorsSource(checkpoint)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key in source.keys():
        match = TARGETS.match(key)
        if not match:
            continue
        out_features, in_features = source.shape(key)[:2]
        r = min(rank, out_features, in_features)
        base = "lora_unet_" + match.group(1).replace(".", "_")
        tensors[base + ".lora_down.weight"] = (torch.randn(r, in_features, generator=generator) * 0.01).half()
        tensors[base + ".lora_up.weight"] = (torch.randn(out_features, r, generator=generator) * 0.01).half()
        tensors[base + ".alpha"] = torch.tensor(float(r))
    save_file(tensors, str(path))
    source.close()
    return len(tensors) // 3


def unet_seconds_per_step(pipe, request: GenerationRequest, repeats: int) -> tuple[float, float]:
    """(best s/step of the UNet stage, highest peak RSS MiB of any stage) over `repeats` calls."""
    best, rss = float("inf"), 0.0
    for _ in range(repeats):
        pipe.meter.records.clear()
        pipe.generate(request)
        unet = [r for r in pipe.meter.records if r.stage == "unet"][0]
        best = min(best, unet.seconds / unet.steps)
        rss = max(rss, max(r.peak_rss_mib for r in pipe.meter.records))
    return best, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=("tiny", "sd15"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", default=["stream", "turbo", "full"])
    args = parser.parse_args()

    model = ensure_model(name=args.model)
    with tempfile.TemporaryDirectory() as folder:
        lora = Path(folder) / "typical.safetensors"
        layers = write_typical_lora(model.checkpoint, lora, args.rank)
        print(f"{args.model} {args.size}px, {args.steps} steps, LoRA rank {args.rank} on {layers} layers, device {args.device}")
        print(f"{'mode':<8} {'s/step':>9} {'with LoRA':>10} {'ratio':>6} {'RSS MiB':>8} {'with LoRA':>10}")
        for mode in args.modes:
            pipe = optimized_sd.load(model.checkpoint, tokenizer=model.tokenizer, device=args.device, memory=mode, precision="full")
            base = GenerationRequest(prompts=["a cube"], steps=args.steps, sampler="euler", seed=1, height=args.size, width=args.size)
            with_lora = GenerationRequest(**{**base.__dict__, "loras": {lora: 0.8}})
            pipe.generate(base)  # warm-up: first placement, allocator, kernels
            plain, plain_rss = unet_seconds_per_step(pipe, base, args.repeats)
            pipe.generate(with_lora)
            patched, patched_rss = unet_seconds_per_step(pipe, with_lora, args.repeats)
            print(f"{mode:<8} {plain:>9.4f} {patched:>10.4f} {patched / plain:>6.2f} {plain_rss:>8.0f} {patched_rss:>10.0f}")
            pipe.close()


if __name__ == "__main__":
    main()

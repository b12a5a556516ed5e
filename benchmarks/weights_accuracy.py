#!/usr/bin/env python
"""What `--weights` costs in accuracy, and what int8 on the CPU gains in speed, as measured.

On the full-size SD 1.5 architecture with seeded random weights (the benchmark's cached fp16 file,
built when missing), fp32 compute on the CPU, single-threaded (the machine is shared):
- the UNet output for one fixed input (CFG batch 2 at 512x512: latents 4x64x64, t=500, a random
  77x768 context) with the weights stored as fp16, bf16, fp8 and int8 (int8 twice: dequantised to fp32
  per layer, and with the Linear layers on fbgemm's dynamic activation quantisation), each as the
  relative error ||out - ref|| / ||ref|| against fp32 weights and against fp16 weights, with the
  seconds of that forward pass;
- the image difference of a small txt2img run (256x256, 3 DDIM steps) against fp32 weights: mean and
  largest absolute pixel difference (0-255) and PSNR.
Random weights (PyTorch's uniform init) have no outliers, so trained weights may quantise less well.

With `--speed`, only the CPU int8 question instead: one pipeline with int8 weights resident, its UNet
called on the same input with the Linear layers dequantised to fp32 and on fbgemm's dynamic int8 path
in turn (each timed on the second call of its stage, the steady state of sampling steps),
`--rounds` times each, alternating, so other work on the machine slows both alike; the fastest of
each counts. This is what chose `int8_matmul`'s default.

    .venv/bin/python benchmarks/weights_accuracy.py [--model sd15|tiny] [--json out.json]
    .venv/bin/python benchmarks/weights_accuracy.py --speed [--size 256] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import optimized_sd  # noqa: E402
from optimized_sd.benchmark.model_cache import ensure_model  # noqa: E402
from optimized_sd.memory.planner import Request  # noqa: E402
from optimized_sd.pipelines.diffusion import GenerationRequest  # noqa: E402

# (label, --weights, int8_matmul)
VARIANTS = (
    ("fp32", None, False),
    ("fp16", "fp16", False),
    ("bf16", "bf16", False),
    ("fp8", "fp8", False),
    ("int8", "int8", False),
    ("int8+dynamic", "int8", True),
)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def unet_forward(pipe, size: int, seed: int = 0, calls: int = 1) -> tuple[torch.Tensor, float]:
    """The UNet's output for a seeded CFG-batch input, and the seconds of the last of `calls` forward
    passes in one sampling stage (a later call is a sampling step's steady state: weights placed, int8
    Linear weights packed)."""
    generator = torch.Generator().manual_seed(seed)
    latent = size // pipe.config.vae.downscale
    x = torch.randn((2, 4, latent, latent), generator=generator)
    context = torch.randn((2, 77, pipe.config.unet.context_dim), generator=generator)
    t = torch.full((2,), 500.0)
    pipe.memory.prepare(Request(size, size, batch=1))
    unet = pipe.model.model.diffusion_model

    def work(record) -> tuple[torch.Tensor, float]:
        for _ in range(calls):
            start = time.perf_counter()
            out = unet(x.to(pipe.dtype), t, context.to(pipe.dtype)).float()
        return out, time.perf_counter() - start

    return pipe.memory.run_stage("unet", work)


def int8_speed(model, size: int, rounds: int) -> dict:
    """Seconds of one UNet forward with int8 weights: Linear layers dequantised vs dynamic, alternating."""
    pipe = optimized_sd.load(model.checkpoint, tokenizer=model.tokenizer, device="cpu", precision="full", memory="turbo", weights="int8")
    seconds: dict[str, list[float]] = {"dequantised": [], "dynamic": []}
    reference = None
    for _ in range(rounds):
        for label in seconds:
            pipe.memory.int8_matmul = label == "dynamic"
            out, elapsed = unet_forward(pipe, size, calls=2)
            seconds[label].append(elapsed)
            if label == "dequantised":
                reference = out
            else:
                dynamic_error = relative_error(out, reference)
            print(f"{label:<12} {elapsed:7.2f} s", flush=True)
    pipe.close()
    best = {label: min(values) for label, values in seconds.items()}
    print(f"int8 UNet forward at {size}x{size}, CFG batch 2: dequantised {best['dequantised']:.2f} s, dynamic {best['dynamic']:.2f} s "
          f"({best['dynamic'] / best['dequantised']:.2f}x); dynamic vs dequantised output rel.err {dynamic_error:.2e}")
    return {"size": size, "rounds": rounds, "seconds": seconds, "best": best, "dynamic_vs_dequantised_rel_err": dynamic_error}


def image(pipe, size: int, steps: int) -> np.ndarray:
    request = GenerationRequest(prompts=["a lighthouse on a cliff"], steps=steps, sampler="ddim", seed=11, height=size, width=size)
    return np.asarray(pipe.generate(request).images[0], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=("sd15", "tiny"))
    parser.add_argument("--size", type=int, default=512, help="UNet input size in pixels")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed", action="store_true", help="only time int8 Linear: dequantised vs dynamic")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ensure_model(name=args.model)
    if args.speed:
        result = int8_speed(model, args.size, args.rounds)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, **result}, indent=1))
        return
    rows, outputs, images = [], {}, {}
    for label, weights, int8_matmul in VARIANTS:
        pipe = optimized_sd.load(model.checkpoint, tokenizer=model.tokenizer, device="cpu", precision="full", memory="turbo",
                                 weights=weights, int8_matmul=int8_matmul)
        assert pipe.memory.int8_matmul == int8_matmul, "fbgemm's dynamic int8 Linear is not available in this torch"
        outputs[label], seconds = unet_forward(pipe, args.size)
        images[label] = image(pipe, args.image_size, args.steps)
        weight_bytes = pipe.memory.sizes.unet
        pipe.close()
        row = {"weights": label, "unet_weight_mib": weight_bytes / 2**20, "unet_forward_s": seconds,
               "rel_err_vs_fp32": relative_error(outputs[label], outputs["fp32"]),
               "rel_err_vs_fp16": relative_error(outputs[label], outputs["fp16"]) if "fp16" in outputs else None}
        difference = np.abs(images[label] - images["fp32"])
        mse = float((difference**2).mean())
        row.update(image_mean_abs=float(difference.mean()), image_max_abs=float(difference.max()),
                   image_psnr_db=math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
        rows.append(row)
        print(f"{label:<13} UNet {row['unet_weight_mib']:7.1f} MiB  forward {seconds:6.2f} s  rel.err vs fp32 {row['rel_err_vs_fp32']:.2e}"
              + (f"  vs fp16 {row['rel_err_vs_fp16']:.2e}" if row["rel_err_vs_fp16"] is not None else "")
              + f"  image |diff| mean {row['image_mean_abs']:.2f} max {row['image_max_abs']:.0f}"
              + f"  PSNR {row['image_psnr_db']:.1f} dB", flush=True)
    setup = {"model": args.model, "unet_input": f"CFG batch 2 at {args.size}x{args.size}, t=500, random context",
             "image": f"{args.image_size}x{args.image_size}, {args.steps} DDIM steps", "threads": args.threads,
             "compute": "fp32 CPU", "torch": torch.__version__}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

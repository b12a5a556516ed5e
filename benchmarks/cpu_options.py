#!/usr/bin/env python
"""What the CPU offers, each option measured on the full-size SD 1.5 architecture (random weights, the
bench cache's fp16 file) in fp32: the UNet call of one sampling step (CFG batch of 2) and the VAE decode
of one image, each against the plain run, with the output's difference from it.

Options (issue 16): channels-last memory format for the convolutions (oneDNN's native layout), each
attention backend at each size, the nearest-x2 upsample convs as upsample-then-conv instead of the
default four phase convs (`models.slabs.NearestUpConv2d`), and bf16 compute where the CPU has native bf16 matmul (AVX512-BF16 or
AMX; elsewhere it is measured too, and said to be emulated). The engine's defaults follow these figures.

    .venv/bin/python benchmarks/cpu_options.py [--size 512] [--repeat 2] [--json out.json] [--options upsample,...]
    .venv/bin/python benchmarks/cpu_options.py --ab full|turbo|split|stream [--size 512] [--repeat 2]

`--ab MODE` times whole pipeline runs instead (2 DDIM steps, the UNet stage's s/step from the memory
meter), with `channels_last=True` and without, alternating so load on the machine falls on both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optimized_sd  # noqa: E402
from optimized_sd.attention import use_attention  # noqa: E402
from optimized_sd.benchmark.model_cache import ensure_model  # noqa: E402
from optimized_sd.models import slabs  # noqa: E402

OPTIONS = ("attention", "upsample", "channels-last", "bf16")


def best_seconds(work: Callable[[], torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    """The fastest of `repeat` runs (after one warm-up), and the last output."""
    out = work()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = work()
        times.append(time.perf_counter() - start)
    return min(times), out


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference.float()).norm() / reference.float().norm())


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags or capability == "AMX"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="every row so far, rewritten after each (a stopped run keeps them)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="auto: only where the CPU has native bf16")
    parser.add_argument("--ab", choices=("full", "turbo", "split", "stream"), help="whole runs with and without channels-last")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"which options to measure against plain: {', '.join(OPTIONS)}")
    return parser.parse_args()


def upsample_row(stage: str, work: Callable[[], torch.Tensor], repeat: int) -> dict:
    """Phase convs against upsample-then-conv, alternating call by call (the difference is within this
    machine's drift); prints and returns the row."""
    times: dict[str, list[float]] = {"phase convs": [], "upsample then conv": []}
    outs = {}
    with torch.inference_mode():
        for _ in range(repeat + 1):
            for way, devices in (("phase convs", {"cpu"}), ("upsample then conv", set())):
                slabs.PHASE_CONV_DEVICES.clear()
                slabs.PHASE_CONV_DEVICES.update(devices)
                start = time.perf_counter()
                outs[way] = work()
                times[way].append(time.perf_counter() - start)
    slabs.PHASE_CONV_DEVICES.add("cpu")  # the default again
    best = {way: min(values[1:]) for way, values in times.items()}  # the first round warms up
    error = relative_error(outs["upsample then conv"], outs["phase convs"])
    ratio = best["upsample then conv"] / best["phase convs"]
    print(f"{stage:<11} {'upsample then conv':<28} {best['upsample then conv']:8.2f} s  {ratio:5.2f}x  error {error:.1e}"
          f"  (alternating with the phase convs, best {best['phase convs']:.2f} s; rounds "
          f"{', '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(*times.values()))})", flush=True)
    return {"option": "upsample then conv", "stage": stage, "seconds": best["upsample then conv"], "ratio": ratio,
            "relative_error": error, "alternating": times}


def main() -> int:
    args = parse_args()
    if args.ab:
        return channels_last_ab(args)

    model = ensure_model(args.cache_dir, "sd15")
    pipe = optimized_sd.load(model.checkpoint, device="cpu", precision="full", memory="full", tokenizer=model.tokenizer)
    pipe.memory.use_mode("full")
    unet = pipe.model.model.diffusion_model
    vae = pipe.model.first_stage_model
    side = args.size // 8
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, side, side, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    timesteps = torch.tensor([500.0, 500.0])
    one_latent = latents[:1] / 0.18215

    def unet_call(x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: unet(x, timesteps, context)

    def decode_call(z: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: vae.decode(z)

    rows: list[dict] = []
    native = native_bf16()
    facts = {"size": args.size, "cpu": torch.backends.cpu.get_cpu_capability(), "native_bf16": native, "threads": torch.get_num_threads()}
    facts["torch"] = torch.__version__

    def measure(
        option: str, stage: str, work: Callable[[], torch.Tensor], reference: torch.Tensor | None, attention: str = "sdpa"
    ) -> torch.Tensor:
        with torch.inference_mode(), use_attention(attention):
            seconds, out = best_seconds(work, args.repeat)
        error = relative_error(out, reference) if reference is not None else 0.0
        base = next((r["seconds"] for r in rows if r["stage"] == stage and r["option"] == "plain"), seconds)
        rows.append({"option": option, "stage": stage, "seconds": seconds, "ratio": seconds / base, "relative_error": error})
        print(f"{stage:<11} {option:<28} {seconds:8.2f} s  {seconds / base:5.2f}x  error {error:.1e}", flush=True)
        if args.json:
            args.json.write_text(json.dumps({**facts, "rows": rows}, indent=2) + "\n")
        return out

    unet_plain = measure("plain", "unet", unet_call(latents), None)
    decode_plain = measure("plain", "vae_decode", decode_call(one_latent), None)
    wanted = set(args.options.split(","))
    for backend in ("sliced",) if "attention" in wanted else ():
        measure(f"attention {backend}", "unet", unet_call(latents), unet_plain, backend)
        measure(f"attention {backend}", "vae_decode", decode_call(one_latent), decode_plain, backend)

    if "upsample" in wanted:
        for stage, work in (("unet", unet_call(latents)), ("vae_decode", decode_call(one_latent))):
            rows.append(upsample_row(stage, work, args.repeat))

    if "channels-last" in wanted:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        measure("channels-last", "unet", unet_call(latents.to(memory_format=torch.channels_last)), unet_plain)
        measure("channels-last", "vae_decode", decode_call(one_latent.to(memory_format=torch.channels_last)), decode_plain)
        unet.to(memory_format=torch.contiguous_format)
        vae.to(memory_format=torch.contiguous_format)

    if "bf16" in wanted and (args.bf16 == "on" or (args.bf16 == "auto" and native)):
        label = "bf16 autocast" + ("" if native else " (emulated here)")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measure(label, "unet", unet_call(latents), unet_plain)
            measure(label, "vae_decode", decode_call(one_latent), decode_plain)
    elif "bf16" in wanted:
        print(f"bf16: skipped, this CPU ({facts['cpu']}) has no native bf16 matmul (--bf16 on measures it emulated)")
    return 0


def channels_last_ab(args: argparse.Namespace) -> int:
    """Whole runs in memory mode `args.ab`, with the UNet channels-last and without, alternating; prints
    each run's UNet s/step and the best of each."""
    from optimized_sd.pipelines.diffusion import GenerationRequest

    model = ensure_model(args.cache_dir, "sd15")
    pipes = {
        name: optimized_sd.load(
            model.checkpoint,
            device="cpu",
            precision="full",
            memory=args.ab,
            tokenizer=model.tokenizer,
            channels_last=name == "channels-last",
        )
        for name in ("channels-last", "plain")
    }
    request = GenerationRequest(prompts=["a cat"], steps=2, scale=7.5, sampler="ddim", seed=1, height=args.size, width=args.size)
    best = dict.fromkeys(pipes, float("inf"))
    for round_index in range(args.repeat):
        for name, pipe in pipes.items():
            pipe.generate(request)
            unet = pipe.meter.summary()["unet"]
            per_step = unet["seconds"] / max(unet["steps"], 1)
            best[name] = min(best[name], per_step)
            print(f"round {round_index + 1} {name:<14} {per_step:7.2f} s/step", flush=True)
    ratio = best["channels-last"] / best["plain"]
    print(f"{args.ab} {args.size}: channels-last {best['channels-last']:.2f} s/step, plain {best['plain']:.2f}: {ratio:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"mode": args.ab, "size": args.size, "best": best, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

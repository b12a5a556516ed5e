#!/usr/bin/env python
"""One memory mode's peak RSS per stage on the CPU: full-size SD 1.5 (the bench cache's random fp16 file),
one 512x512 txt2img in fp32, the stage table of the memory meter and the process' peak RSS. Run each mode
in a process of its own (the peak is the whole process'):

    for mode in full turbo split stream; do .venv/bin/python benchmarks/cpu_mode_rss.py $mode; done
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optimized_sd  # noqa: E402
from optimized_sd.benchmark.model_cache import ensure_model  # noqa: E402
from optimized_sd.pipelines.diffusion import GenerationRequest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("full", "turbo", "split", "stream"))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    model = ensure_model(args.cache_dir, "sd15")
    pipe = optimized_sd.load(model.checkpoint, device="cpu", precision="full", memory=args.mode, tokenizer=model.tokenizer)
    print(f"{args.mode}: RSS after load {psutil.Process().memory_info().rss / 2**20:,.0f} MiB")
    pipe.generate(GenerationRequest(prompts=["a red cube"], steps=args.steps, height=args.size, width=args.size, sampler="ddim"))
    print(pipe.meter.format_table(pipe.meter.summary()))
    print(f"{args.mode}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB (host {pipe.plan.host})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""`stream`'s per-step overhead over `full` on the CPU: the tiny SD 1.5 and SDXL benchmark models at
256x256 (weights of a few MB, so any gap is per-call work of the memory engine, not bandwidth).

Each mode runs in a worker process of its own (its peak RSS is its own, and `stream`'s heap tuning,
which is process-wide, cannot touch `full`), loaded once and warmed up; the parent then asks the two for
one generation at a time, alternating (and swapping which goes first every round) so load from other
work on the machine falls on both. Prints each round's UNet s/step (the memory meter's sampling stage)
and the CPU seconds of the whole call, then the medians, the ratio stream/full and each worker's peak RSS.
One torch thread per worker by default: on a loaded machine a descheduled OpenMP thread stalls every op of
both modes and the ratio is noise (0.7x-6x seen with two threads on two busy cores).

    .venv/bin/python benchmarks/stream_overhead.py [--rounds 5] [--steps 4] [--size 256] [--models tiny,tiny-sdxl] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("full", "stream")


def worker(args: argparse.Namespace) -> int:
    """Load `args.model` in `args.mode`, warm up, then run one generation per line read from stdin and
    answer each with a JSON line: UNet s/step, CPU seconds of the call, peak RSS so far."""
    import torch

    import optimized_sd
    from optimized_sd.benchmark.model_cache import ensure_model
    from optimized_sd.pipelines.diffusion import GenerationRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    model = ensure_model(args.cache_dir, args.model)
    pipe = optimized_sd.load(model.checkpoint, device="cpu", precision="full", memory=args.mode, tokenizer=model.tokenizer)
    request = GenerationRequest(
        prompts=["a red cube"], steps=args.steps, height=args.size, width=args.size, sampler="ddim", seed=1
    )
    pipe.generate(request)  # warm-up: first-call allocations and oneDNN's kernel choices
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        cpu = time.process_time()
        pipe.generate(request)
        cpu = time.process_time() - cpu
        unet = pipe.meter.summary()["unet"]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"s_per_step": unet["seconds"] / max(unet["steps"], 1), "cpu_s": cpu, "peak_rss_mib": peak}), flush=True)
    return 0


def start(args: argparse.Namespace, model: str, mode: str) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker", model, mode, "--steps", str(args.steps), "--size", str(args.size)]
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return process


def answer(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"worker {process.args[3:5]} exited with {process.wait()}")
    return json.loads(line)


def compare(args: argparse.Namespace, model: str) -> dict:
    """Both modes of one model, alternating; returns the medians and the ratio."""
    workers = {mode: start(args, model, mode) for mode in MODES}
    for process in workers.values():
        answer(process)  # loaded and warmed up
    rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        order = MODES if round_index % 2 == 0 else MODES[::-1]
        for mode in order:
            workers[mode].stdin.write("go\n")
            workers[mode].stdin.flush()
            row = answer(workers[mode])
            rows[mode].append(row)
            print(f"{model} round {round_index + 1} {mode:<6} {row['s_per_step']:.4f} s/step  {row['cpu_s']:.2f} CPU s", flush=True)
    for process in workers.values():
        process.stdin.close()
        process.wait()
    result = {}
    for mode in MODES:
        result[mode] = {
            "s_per_step": statistics.median(r["s_per_step"] for r in rows[mode]),
            "cpu_s": statistics.median(r["cpu_s"] for r in rows[mode]),
            "peak_rss_mib": rows[mode][-1]["peak_rss_mib"],
        }
    result["ratio"] = result["stream"]["s_per_step"] / result["full"]["s_per_step"]
    result["cpu_ratio"] = result["stream"]["cpu_s"] / result["full"]["cpu_s"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--models", default="tiny,tiny-sdxl", help="benchmark model names, comma-separated")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (0: torch's default; more than 1 times waits on a busy machine)"
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.model, args.mode = args.worker
        return worker(args)
    from optimized_sd.benchmark.model_cache import ensure_model

    results = {}
    for model in args.models.split(","):
        ensure_model(args.cache_dir, model)  # written once here, not by both workers at once
        result = results[model] = compare(args, model)
        full, stream = result["full"], result["stream"]
        print(
            f"{model} {args.size}x{args.size}: full {full['s_per_step']:.4f} s/step, stream {stream['s_per_step']:.4f}: "
            f"{result['ratio']:.2f}x (CPU s per call {result['cpu_ratio']:.2f}x); "
            f"peak RSS full {full['peak_rss_mib']:,.0f} MiB, stream {stream['peak_rss_mib']:,.0f} MiB",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

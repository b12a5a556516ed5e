#!/usr/bin/env python
"""Batch fan-out on this machine's CPU: images per minute in this process and on a local Ray runtime
with 1 and 2 CPU workers (one torch thread each), on the tiny model (random weights, `config.TINY`)
at a size where one image costs a measurable time. Model loading is timed apart from rendering, so
the output says from which batch size fan-out pays. Never run on a full-size model here.

    .venv/bin/python benchmarks/batch_scaling.py [--images 8] [--size 256] [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized_sd.batch import LoadSpec, LocalPool, read_jobs, run_batch  # noqa: E402
from optimized_sd.batch.driver import WorkerPool  # noqa: E402
from optimized_sd.benchmark.runner import build_model  # noqa: E402
from optimized_sd.pipelines.job import Job, OutputPolicy  # noqa: E402
from optimized_sd.pipelines.load_options import LoadOptions  # noqa: E402


def measure(pool: WorkerPool, jobs_file: Path, defaults: Job) -> dict[str, float]:
    """Seconds to start the pool (model loads) and to render the batch, and images per minute of rendering."""
    jobs = read_jobs(jobs_file, defaults)
    started = time.perf_counter()
    pool.start()
    loaded = time.perf_counter()
    with tempfile.TemporaryDirectory() as outdir:
        report = run_batch(jobs, Path(outdir), pool)  # start() again is a no-op: the model is loaded
    done = time.perf_counter()
    images = len(report.written)
    assert images == sum(job.images for job in jobs) and not report.failures
    return {"load_s": loaded - started, "render_s": done - loaded, "images": images, "images_per_min": 60 * images / (done - loaded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import ray
    import torch

    from optimized_sd.batch.ray_pool import RayPool, connect

    model = build_model(args.cache_dir, "tiny")
    spec = LoadSpec(Path(model.checkpoint), LoadOptions(tokenizer=model.tokenizer, device="cpu"))
    defaults = Job(prompts=("a lighthouse at dusk",), steps=args.steps, sampler="euler", height=args.size, width=args.size, seed=1,
                   output=OutputPolicy(Path("unused")))  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        jobs_file = Path(folder) / "jobs.jsonl"
        jobs_file.write_text(json.dumps({"n_samples": args.images}) + "\n")
        rows: dict[str, dict[str, float]] = {}
        threads = torch.get_num_threads()
        rows[f"in-process ({threads} threads)"] = measure(LocalPool(spec), jobs_file, defaults)
        started = time.perf_counter()
        runtime = connect(None, num_cpus=2)
        ray_start = time.perf_counter() - started
        try:
            for workers in (1, 2):
                rows[f"ray, {workers} worker(s) x 1 thread"] = measure(RayPool(runtime, spec, workers, 0), jobs_file, defaults)
        finally:
            ray.shutdown()
    print(f"tiny model, {args.size}x{args.size}, {args.steps} euler steps, {args.images} images; Ray runtime start {ray_start:.1f} s")
    print(f"{'run':<34} {'load s':>7} {'render s':>9} {'img/min':>8}")
    for name, row in rows.items():
        print(f"{name:<34} {row['load_s']:>7.1f} {row['render_s']:>9.1f} {row['images_per_min']:>8.1f}")
    one, two = rows["ray, 1 worker(s) x 1 thread"], rows["ray, 2 worker(s) x 1 thread"]
    local = rows[f"in-process ({threads} threads)"]
    print(f"scaling 2 workers / 1 worker: {two['images_per_min'] / one['images_per_min']:.2f}x")
    # fan-out pays from the batch size n where n/r_local + L_local = n/r_ray + L_ray + ray start (r per second)
    per_image_saved = 60 / local["images_per_min"] - 60 / two["images_per_min"]
    overhead = two["load_s"] + ray_start - local["load_s"]
    if per_image_saved > 0:
        print(
            f"2 Ray workers beat the in-process run from about {max(1, round(overhead / per_image_saved))} images "
            f"(overhead {overhead:.1f} s, {per_image_saved:.2f} s saved per image)"
        )
    else:
        print("2 Ray workers do not beat the in-process run here: the in-process run already uses every core")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "ray_start_s": ray_start, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()

"""Running `optimized-sd bench` in-process on the tiny model, the way the harness tests do."""

from __future__ import annotations

import json
from pathlib import Path

from optimized_sd.benchmark.results import BenchRecord
from optimized_sd.benchmark.runner import BenchOptions, run_bench


def run_tiny_bench(tmp_path: Path, **flags) -> tuple[Path, BenchRecord, list[str]]:
    """`bench --model tiny --sizes 64 --device cpu` plus `flags`, its cache and results under `tmp_path`;
    returns the results folder, its results.json read back, and the lines the run printed."""
    defaults = dict(model="tiny", sizes="64", device="cpu", cache_dir=tmp_path / "cache", out=tmp_path / "results")
    lines: list[str] = []
    folder = run_bench(BenchOptions(**{**defaults, **flags}), lambda text="", nl=True: lines.append(text))
    return folder, BenchRecord.from_json(json.loads((folder / "results.json").read_text())), lines

"""The pinned ring against the fully pinned run (issue 26): two bench results folders of the same `stream` scenario,
one run with no RAM budget (the packed pinned copy of the whole model) and one with `--ram-budget` (the bounded
ring), compared on host RSS (whole process; per stage anonymous, file-backed and pinned), s/step and loading.

    python benchmarks/ring_check.py RESULTS_PINNED RESULTS_RING

The goals it checks: ring host RSS <= 3 GB, its s/step <= 1.2x the pinned run's, loading <= 2 s."""

from __future__ import annotations

import sys
from pathlib import Path

from optimized_sd.benchmark.results import BenchRecord, ScenarioResult

RSS_GOAL_MIB = 3 * 1024
STEP_RATIO_GOAL = 1.2
LOAD_GOAL_SECONDS = 2.0


def stream_result(folder: Path) -> ScenarioResult:
    """The folder's one finished `stream` row."""
    import json

    record = BenchRecord.from_json(json.loads((folder / "results.json").read_text()))
    rows = [r for r in record.results if r.ok and r.scenario.mode == "stream"]
    if not rows:
        raise SystemExit(f"{folder}: no finished stream row")
    return rows[0]


def describe(name: str, result: ScenarioResult) -> list[str]:
    lines = [f"{name}: peak RSS {result.peak_rss_mib:.0f} MiB, after load {result.rss_after_load_mib:.0f} MiB, "
             f"load {result.load_seconds:.2f} s, s/step {result.seconds_per_step or 0:.3f}"]  # fmt: skip
    for stage, figures in result.stages.items():
        lines.append(
            f"  {stage:<12} RSS {figures.peak_rss_mib:8.0f}  anon {figures.peak_rss_anon_mib:8.0f}  "
            f"file {figures.peak_rss_file_mib:8.0f}  pinned {figures.pinned_mib:8.0f} MiB"
        )
    return lines


def main(pinned_folder: str, ring_folder: str) -> int:
    pinned, ring = stream_result(Path(pinned_folder)), stream_result(Path(ring_folder))
    print("\n".join(describe("fully pinned", pinned) + describe("ring", ring)))
    ratio = (ring.seconds_per_step or 0) / (pinned.seconds_per_step or float("inf"))
    checks = {
        f"ring peak RSS {ring.peak_rss_mib:.0f} MiB <= {RSS_GOAL_MIB} MiB": ring.peak_rss_mib <= RSS_GOAL_MIB,
        f"s/step ratio {ratio:.2f} <= {STEP_RATIO_GOAL}": ratio <= STEP_RATIO_GOAL,
        f"ring load {ring.load_seconds:.2f} s <= {LOAD_GOAL_SECONDS} s": ring.load_seconds <= LOAD_GOAL_SECONDS,
    }
    for words, met in checks.items():
        print(f"{'met ' if met else 'MISSED'} {words}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))

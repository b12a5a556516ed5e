"""`optimized-sd bench`: parse flags and hand them to the runner. Imports nothing heavy."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from optimized_sd.benchmark.scenarios import KINDS, OUR_MODES, PEERS


def command_text() -> str:
    """The command as typed, from `bench` on, for the results header."""
    argv = sys.argv
    rest = argv[argv.index("bench") + 1 :] if "bench" in argv else []
    return " ".join(["optimized-sd", "bench"] + [shlex.quote(a) for a in rest])


@click.command()
@click.option("--quick", is_flag=True, help="256x256, 2 steps, txt2img: modes full and stream against diffusers (minutes on a CPU).")
@click.option("--sizes", help="Square sizes (or WxH), comma-separated.  [default: 512]")
@click.option("--batch", "batches", help="Images per call, comma-separated, e.g. 1,4.  [default: 1]")
@click.option("--kinds", help=f"{' and/or '.join(KINDS)}, comma-separated.  [default: txt2img,img2img]")
@click.option("--modes", help=f"Our memory modes: {', '.join(OUR_MODES)}, auto; 'all' or 'none'.  [default: all four]")
@click.option("--peers", help=f"Peer configurations: {', '.join(PEERS)}; 'all' or 'none'.  [default: all the device and the installed packages can run]")
@click.option("--steps", type=int, help="DDIM steps.  [default: 10 on CUDA, 2 on the CPU]")
@click.option("--device", help="cuda, cuda:N or cpu.  [default: the best available]")
@click.option("--budget", help="The frontier: at each budget (e.g. 0.6GB,1GB,2GB,none), ours in `auto` and every peer under a hard cap of that much memory (CUDA: the card's memory, context included; CPU: the process' RSS). A run that does not fit is recorded as not completing.")
@click.option("--seed-workload", "seed_workload", is_flag=True, help="optimizedSD's `--n_samples 10 --n_iter 2 --turbo` at 512: `turbo` under a 2.4GB cap (or --budget), the planner choosing the UNet micro-batch, against uncapped `full`.")
@click.option("--only", help="Run only the scenarios whose names match these globs (comma-separated), e.g. 'txt2img-512-*'.")
@click.option("--list", "list_only", is_flag=True, help="Print the scenario names the flags give, and stop.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True, help="Folder that receives <device>-<date>-<label>/.")
@click.option("--label", help="Last part of the results folder's name.  [default: quick, or the sizes]")
@click.option("--cache-dir", "cache_dir", type=click.Path(path_type=Path), help="Where the benchmark models live (sd15 2 GB, sd2 2.4 GB, sdxl 6.5 GB).  [default: $OPTIMIZED_SD_CACHE or ~/.cache/optimized-sd/bench]")
@click.option("--model", default="sd15", show_default=True, help="sd15, sd2 (768-v) or sdxl (full size, random weights), or tiny, tiny-sd2, tiny-sdxl (check the harness in seconds).")
@click.option("--precision", default="autocast", show_default=True, help="autocast (fp16 on CUDA, fp32 on the CPU), full, fp16 or bf16; both engines.")
@click.option("--weights", type=click.Choice(["fp16", "bf16", "fp8", "int8"]), help="How our engine stores its weights (8-bit: dequantised per layer at compute); peers keep theirs.  [default: as the file]")
@click.option("--ram-budget", "ram_budget", help="Our engine's host-RAM budget (--ram-budget: e.g. 3GB, or auto); peers keep theirs.  [default: no limit]")
@click.option("--attention", default="sdpa", show_default=True, help="Our attention backend.")
@click.option("--warmup", type=int, help="Unmeasured runs before the measured one.  [default: 1 on CUDA, 0 on the CPU]")
@click.option("--repeat", type=int, default=1, show_default=True, help="Measured runs per scenario (same process): the fastest run's times, the highest peaks.")
@click.option("--timeout", type=float, default=1800.0, show_default=True, help="Seconds before a scenario's process is killed.")
@click.option("--update", is_flag=True, help="Merge into the results folder's earlier run: rows measured again replace theirs (e.g. with --only after a disturbed run).")
@click.option("--render", "render_dir", type=click.Path(path_type=Path), help="Only rebuild results.md and chart.png from DIR/results.json.")
def bench(list_only: bool, render_dir: Path | None, **flags) -> None:
    """Measure memory and speed of every mode, side by side with diffusers, on the full-size SD 1.5
    architecture (random weights, built once into the cache). Each scenario runs in its own process."""
    from optimized_sd.benchmark.runner import BenchOptions, guess_device_type, render, run_bench, scenario_names

    if render_dir is not None:
        for path in render(render_dir):
            click.echo(f"wrote {path}")
        return
    options = BenchOptions(**flags, command=command_text())
    if list_only:
        for scenario in scenario_names(options, guess_device_type(options.device)):
            click.echo(scenario.name)
        return
    run_bench(options, click.echo)

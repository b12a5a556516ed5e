"""Run a benchmark: probe the machine, build or reuse the model, run each scenario in a fresh process
(so its peaks are its own), print a line per scenario, and write the results folder.

This process imports no torch: every measurement happens in `optimized_sd.benchmark.worker`."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import click

from optimized_sd.benchmark import report
from optimized_sd.benchmark.caps import parse_budget
from optimized_sd.benchmark.results import BenchModel, BenchRecord, Machine, ScenarioResult, ScenarioTask, Settings, from_json
from optimized_sd.benchmark.scenarios import DEFAULT_STEPS, QUICK, SEED_WORKLOAD, Scenario, Selection, select_scenarios, split_list
from optimized_sd.benchmark.worker import PROMPT, RESULT_PREFIX, SCALE, SEED, STRENGTH  # stdlib-only module
from optimized_sd.errors import UserError
from optimized_sd.memory.precision import PRECISIONS

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
MODEL_DESCRIPTIONS = {
    "sd15": "full-size SD 1.5 architecture (1.07 B parameters) with seeded random weights, fp16 single-file "
    "safetensors in the LDM layout, stand-in byte tokenizer",
    "sd2": "full-size SD 2.x 768-v architecture (1.29 B parameters: OpenCLIP ViT-H run to its 23rd layer) with seeded "
    "random weights, fp16 single-file safetensors in the LDM layout, stand-in byte tokenizer",
    "sdxl": "full-size SDXL base architecture (3.47 B parameters: UNet 2.57 B, CLIP ViT-L and OpenCLIP bigG) with seeded "
    "random weights, fp16 single-file safetensors in the SGM layout, stand-in byte tokenizers",
    "tiny": "tiny test model (config.TINY) with seeded random weights: for checking the harness, not for timing",
    "tiny-sd2": "tiny SD 2.x (v) test model with seeded random weights: for checking the harness, not for timing",
    "tiny-sdxl": "tiny SDXL test model with seeded random weights: for checking the harness, not for timing",
}


@dataclass
class BenchOptions:
    """Everything `optimized-sd bench` was asked for (None: the device-dependent default)."""

    quick: bool = False
    sizes: str | None = None
    batches: str | None = None
    kinds: str | None = None
    modes: str | None = None
    peers: str | None = None
    steps: int | None = None
    device: str | None = None
    budget: str | None = None
    only: str | None = None
    out: Path = Path("benchmarks/results")
    cache_dir: Path | None = None
    model: str = "sd15"
    precision: str = "autocast"
    attention: str = "sdpa"
    weights: str | None = None  # our engine's weight storage (--weights); peers keep theirs
    ram_budget: str | None = None  # our engine's host-RAM budget (--ram-budget); peers keep theirs
    warmup: int | None = None
    repeat: int = 1
    update: bool = False  # merge into the results folder's earlier results.json (re-measured rows replace theirs)
    timeout: float = 1800.0
    label: str | None = None
    command: str = "optimized-sd bench"
    seed_workload: bool = False

    def resolved(self) -> dict:
        """Flag values with the presets and defaults filled in (steps/warmup need the device). With
        --budget (the frontier) our runs are `auto` under each budget, so no fixed mode by default;
        the seed workload is ours alone: `full` uncapped beside the capped run it adds."""
        preset = QUICK if self.quick else SEED_WORKLOAD if self.seed_workload else {}
        frontier = self.budget is not None and not self.seed_workload
        return {
            "sizes": self.sizes or preset.get("sizes", "512"),
            "batches": self.batches or preset.get("batches", "1"),
            "kinds": self.kinds or preset.get("kinds", "txt2img" if frontier else "txt2img,img2img"),
            "modes": self.modes if self.modes is not None else preset.get("modes", "none" if frontier else "full,turbo,split,stream"),
            "peers": self.peers if self.peers is not None else preset.get("peers", "all"),
            "steps": self.steps or preset.get("steps"),
            "n_iter": preset.get("n_iter", 1),
        }


def guess_device_type(device: str | None) -> str:
    """cpu or cuda without importing torch: what --device says, else whether an NVIDIA device node exists."""
    if device:
        return "cpu" if device.startswith("cpu") else "cuda"
    return "cuda" if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists() else "cpu"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def worker_env() -> dict[str, str]:
    """The worker finds this package even when it is not installed, and never reaches for the hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_worker(payload: dict, timeout: float | None) -> dict:
    """Run one worker task in a fresh interpreter and return its JSON result (a failure is a result too:
    `ok` false, with `user_error` or `error`)."""
    command = [sys.executable, "-m", "optimized_sd.benchmark.worker", json.dumps(payload)]
    # A session of its own, so a timeout ends the worker's children too (the OpenVINO peer converts in one).
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(), cwd=os.getcwd(), start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return {"ok": False, "error": f"timed out after {timeout:.0f} s (killed)"}
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
    if done.returncode in (-9, 137):
        reason = "killed (SIGKILL: out of host memory?)"
    else:
        reason = f"worker exited with status {done.returncode}"
    return {"ok": False, "error": f"{reason}: {tail[0][:300]}", "stderr_tail": done.stderr[-3000:]}


def build_model(cache_dir: Path | str | None, model: str) -> BenchModel:
    """Build (or reuse) the benchmark model in a worker process: its paths and facts."""
    built = run_worker({"task": "build", "cache_dir": str(cache_dir) if cache_dir else None, "model": model}, timeout=3600)
    if not built.get("ok"):
        raise UserError(built.get("user_error") or f"cannot build the benchmark model: {built.get('error')}")
    return from_json(BenchModel, built)


def probe_machine(device: str | None) -> Machine:
    """The machine and software, and the host-to-device bandwidth on CUDA, from a worker process."""
    probed = run_worker({"task": "probe", "device": device, "bandwidth": True}, timeout=300)
    if not probed.get("ok"):
        raise UserError(probed.get("user_error") or f"cannot probe the device: {probed.get('error')}")
    return from_json(Machine, probed)


def scenario_task(
    model: BenchModel, device: str, *, precision: str, attention: str, warmup: int, repeat: int, weights: str | None = None,
    ram_budget: str | None = None,
) -> ScenarioTask:
    """What every scenario worker is sent besides its scenario."""
    return ScenarioTask(
        device=device,
        checkpoint=model.checkpoint,
        tokenizer=model.tokenizer,
        diffusers_config=model.diffusers_config,
        precision=precision,
        attention=attention,
        weights=weights,
        ram_budget=ram_budget,
        warmup=warmup,
        repeat=repeat,
    )


def run_scenario(task: ScenarioTask, scenario: Scenario, timeout: float | None) -> ScenarioResult:
    """One scenario in its own worker process; a failure is a row too."""
    raw = run_worker(task.payload(scenario), timeout=timeout)
    return ScenarioResult.from_json({**raw, "scenario": scenario.to_dict()})


def progress_line(result: ScenarioResult, cuda: bool) -> str:
    if not result.ok:
        return ("does not complete: " if result.oom else "failed: ") + result.failure
    memory = f"peak VRAM {result.peak_allocated_mib:,.0f} MiB, " if cuda else ""
    mode = f" [{result.mode_used}]" if result.mode_used and result.mode_used != result.scenario.mode else ""
    if result.seconds_per_step is None:
        return f"{result.seconds_per_image:.2f} s/image{mode}"
    return (
        f"{result.seconds_per_step:.3f} s/step, {result.seconds_per_image:.2f} s/image, {memory}"
        f"peak RSS {result.peak_rss_mib:,.0f} MiB (load {result.load_seconds:.1f} s){mode}"
    )


def select(options: BenchOptions, device_type: str) -> Selection:
    flags = options.resolved()
    chosen = select_scenarios(
        kinds=flags["kinds"],
        sizes=flags["sizes"],
        batches=flags["batches"],
        steps=flags["steps"] or DEFAULT_STEPS.get(device_type, 2),
        modes=flags["modes"],
        peers=flags["peers"],
        device_type=device_type,
        budget=None if options.seed_workload else options.budget,
        only=options.only,
        n_iter=flags["n_iter"],
        model=options.model,
        installed=installed,
    )
    if options.seed_workload:  # the capped run first, then what it is compared with
        cap = options.budget or SEED_WORKLOAD["budget"]
        if len(split_list(cap)) != 1 or parse_budget(cap) is None:
            raise UserError(f"--seed-workload takes one --budget (default {SEED_WORKLOAD['budget']}), not {cap!r}")
        capped = [replace(s, mode=SEED_WORKLOAD["mode"], budget=cap) for s in chosen.scenarios if s.engine == "ours"]
        chosen = Selection(list(dict.fromkeys(capped + chosen.scenarios)), chosen.notes)
    return chosen


OutOfMemoryAt = dict[tuple[str, str], str]  # (work group, configuration) -> the largest budget it did not complete at


def note_out_of_memory(out_of_memory: OutOfMemoryAt, result: ScenarioResult) -> None:
    scenario = result.scenario
    if not (result.oom and scenario.budget):
        return
    key = (scenario.group, scenario.mode)
    known = out_of_memory.get(key)
    if known is None or parse_budget(scenario.budget) > parse_budget(known):
        out_of_memory[key] = scenario.budget


def skipped_for_memory(scenario: Scenario, out_of_memory: OutOfMemoryAt) -> ScenarioResult | None:
    """A frontier run not worth starting: the same configuration on the same work did not complete at
    this budget or a larger one, so it cannot complete at this one."""
    larger = out_of_memory.get((scenario.group, scenario.mode))
    if scenario.budget is None or larger is None or parse_budget(scenario.budget) > parse_budget(larger):
        return None
    return ScenarioResult(scenario, ok=False, oom=True, error=f"not run: does not complete at {larger} already")


def run_scenarios(
    scenarios: list[Scenario],
    run: Callable[[Scenario], ScenarioResult],
    done: Callable[[int, Scenario, ScenarioResult], None],
    earlier: list[ScenarioResult] = (),
) -> list[ScenarioResult]:
    """Run each scenario (`run`), except those `skipped_for_memory` says cannot complete, given these
    results and `earlier` ones (a run continued with --update); `done` hears of each result as it
    comes (index from 1)."""
    results = []
    out_of_memory: OutOfMemoryAt = {}
    for result in earlier:
        note_out_of_memory(out_of_memory, result)
    for index, scenario in enumerate(scenarios, 1):
        result = skipped_for_memory(scenario, out_of_memory) or run(scenario)
        note_out_of_memory(out_of_memory, result)
        results.append(result)
        done(index, scenario, result)
    return results


def check_flags(options: BenchOptions) -> None:
    """Everything that can be refused before any process starts."""
    from optimized_sd.benchmark.model_cache import MODELS

    if options.model not in MODELS:
        raise UserError(f"unknown --model {options.model!r}; choose {', '.join(MODELS)}")
    if options.precision not in PRECISIONS:
        raise UserError(f"unknown --precision {options.precision!r}; use {', '.join(PRECISIONS)}")
    if options.warmup is not None and options.warmup < 0:
        raise UserError("--warmup must be 0 or more")
    if options.repeat < 1:
        raise UserError("--repeat must be at least 1")
    if options.timeout <= 0:
        raise UserError("--timeout must be above zero")
    if options.quick and options.seed_workload:
        raise UserError("--quick and --seed-workload are two presets; give one")
    select(options, guess_device_type(options.device))  # names, sizes, numbers: fails fast with a one-line error


def results_folder(options: BenchOptions, machine: Machine, date: str) -> Path:
    sizes = options.resolved()["sizes"].split(",")
    preset = "quick" if options.quick else "seed-workload" if options.seed_workload else "frontier" if options.budget else None
    label = options.label or preset or "-".join(size.replace("x", "by") for size in sizes)
    if options.model != "sd15":
        label += f"-{options.model}"
    if options.weights:
        label += f"-{options.weights}"
    if options.ram_budget:
        label += f"-ram{options.ram_budget}"
    return Path(options.out) / f"{report.device_label(machine)}-{date}-{label}"


def echo_machine(machine: Machine, notes: list[str], echo: Callable[..., None]) -> None:
    """What runs the benchmark, and what the selection left out."""
    where = machine.gpu or f"CPU {machine.cpu}"
    echo(f"device: {machine.device} ({where}); torch {machine.torch}; diffusers {machine.diffusers or 'not installed'}")
    if machine.bandwidth:
        echo(f"host-to-device bandwidth: {machine.bandwidth.best_gbps:.1f} GB/s (pinned, best of 5)")
    for note in notes:
        echo(f"note: {note}")


def prepare_model(options: BenchOptions, echo: Callable[..., None]) -> BenchModel:
    """The benchmark model, built in the cache or reused, with its description."""
    echo(f"model: preparing the {options.model} benchmark model in the cache ...")
    model = replace(build_model(options.cache_dir, options.model), description=MODEL_DESCRIPTIONS[options.model])
    echo(f"model: {'built' if model.built else 'reused'} {model.checkpoint} ({model.file_bytes / 2**30:.2f} GiB, {model.seconds:.0f} s)")
    return model


def bench_settings(options: BenchOptions, device_type: str, steps: int, warmup: int) -> Settings:
    """The settings every scenario shares, as the record states them."""
    dtype = {"autocast": "fp32 (CPU)" if device_type == "cpu" else "fp16"}.get(options.precision, options.precision)
    return Settings(
        prompt=PROMPT,
        seed=SEED,
        scale=SCALE,
        strength=STRENGTH,
        sampler="ddim",
        steps=steps,
        precision=options.precision,
        dtype=dtype,
        attention=options.attention,
        weights=options.weights,
        ram_budget=options.ram_budget,
        warmup=warmup,
        repeat=options.repeat,
        timeout_s=options.timeout,
    )


def run_bench(options: BenchOptions, echo: Callable[..., None] = click.echo) -> Path:
    """The whole benchmark; returns the results folder."""
    check_flags(options)
    started = time.time()
    date = time.strftime("%Y-%m-%d", time.localtime(started))
    machine = probe_machine(options.device)
    device_type = machine.device_type
    selection = select(options, device_type)
    steps = selection.scenarios[0].steps
    warmup = options.warmup if options.warmup is not None else (1 if device_type == "cuda" else 0)
    echo_machine(machine, selection.notes, echo)
    model = prepare_model(options, echo)
    task = scenario_task(
        model,
        machine.device,
        precision=options.precision,
        attention=options.attention,
        warmup=warmup,
        repeat=options.repeat,
        weights=options.weights,
        ram_budget=options.ram_budget,
    )
    record = BenchRecord(
        command=options.command,
        date=date,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        wall_seconds=0.0,
        machine=machine,
        model=model,
        settings=bench_settings(options, device_type, steps, warmup),
        budget=options.budget,
        notes=selection.notes,
    )
    folder = results_folder(options, machine, date)
    earlier = load_earlier(folder) if options.update else None
    total = len(selection.scenarios)

    def run(scenario: Scenario) -> ScenarioResult:
        echo(f"[{len(record.results) + 1}/{total}] {scenario.name} ...", nl=False)
        return run_scenario(task, scenario, options.timeout)

    def done(index: int, scenario: Scenario, result: ScenarioResult) -> None:
        if result.error and result.error.startswith("not run:"):
            echo(f"[{index}/{total}] {scenario.name} ...", nl=False)
        record.results.append(result)
        record.wall_seconds = time.time() - started
        echo(" " + progress_line(result, device_type == "cuda"))
        report.write_partial(merged(record, earlier, []), folder)  # what a killed run leaves

    run_scenarios(selection.scenarios, run, done, earlier.results if earlier else [])
    record.wall_seconds = time.time() - started
    if options.update:
        record = merged(record, earlier, [s.name for s in selection.scenarios])
    written = report.write_outputs(record, folder)
    if record.chart_note:
        echo(f"note: {record.chart_note}")
    echo(f"wrote {', '.join(str(p) for p in written)} ({record.wall_seconds:.0f} s in all)")
    return folder


def read_record(path: Path, flag: str) -> BenchRecord:
    """A saved results.json; a file that cannot be read is the user's one-line error."""
    try:
        return BenchRecord.from_json(json.loads(path.read_text()))
    except ValueError as error:
        raise UserError(f"{flag}: {path} is not readable JSON: {error}") from None
    except (TypeError, KeyError, AttributeError) as error:
        raise UserError(f"{flag}: {path} is not an optimized-sd bench results.json ({type(error).__name__}: {error})") from None


def load_earlier(folder: Path) -> BenchRecord | None:
    path = folder / "results.json"
    return read_record(path, "--update") if path.is_file() else None


def merged(record: BenchRecord, earlier: BenchRecord | None, rerun: list[str]) -> BenchRecord:
    """The earlier run's rows, with the ones measured again replaced in place and new ones appended;
    the header keeps the earlier command and start, and a note says which rows are newer and how."""
    if not earlier:
        return record
    fresh = {r.scenario.name: r for r in record.results}
    rows = [fresh.pop(r.scenario.name, r) for r in earlier.results] + list(fresh.values())
    notes = [n for n in earlier.notes if n not in record.notes] + record.notes
    if rerun:
        notes.append(
            f"re-measured on {record.started} with `{record.command}`: {', '.join(rerun)}; "
            f"the other rows come from `{earlier.command}` on {earlier.started}"
        )
    return replace(
        record,
        command=earlier.command,
        started=earlier.started,
        results=rows,
        notes=notes,
        wall_seconds=record.wall_seconds + earlier.wall_seconds,
    )


def render(folder: Path) -> list[Path]:
    """Rebuild results.md and chart.png from a saved results.json."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise UserError(f"--render: no results.json in {folder}")
    return report.write_outputs(read_record(path, "--render"), Path(folder))


def scenario_names(options: BenchOptions, device_type: str) -> list[Scenario]:
    check_flags(options)
    return select(options, device_type).scenarios

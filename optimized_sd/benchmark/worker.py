"""One benchmark task in a process of its own, so that its peaks (VRAM, RSS) are its own:
`python -m optimized_sd.benchmark.worker '<json>'` prints one line `BENCH-RESULT {json}`.

Tasks: `probe` (machine and software, host-to-device bandwidth on CUDA), `build` (the cached model),
`scenario` (load a model, run it `warmup` times unmeasured, then `repeat` times measured, in our engine
or diffusers'; timings are the fastest measured run's, peaks the highest of all)."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from typing import TextIO, TypeVar

from optimized_sd.benchmark.caps import (
    CPU_RSS,
    MIB,
    UNCAPPED,
    BudgetAboveDevice,
    BudgetTooSmall,
    CapFacts,
    cpu_cap,
    cuda_cap,
    parse_budget,
)
from optimized_sd.benchmark.results import (
    Bandwidth,
    BenchModel,
    Footprint,
    Machine,
    PlanFacts,
    ScenarioResult,
    ScenarioTask,
    StageFigures,
    from_json,
)
from optimized_sd.benchmark.scenarios import Scenario
from optimized_sd.errors import OutOfMemoryBudget, UserError
from optimized_sd.memory.precision import compute_dtype_name
from optimized_sd.pipelines.defaults import DEFAULT_STRENGTH

RESULT_PREFIX = "BENCH-RESULT "
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
SEED = 42
SCALE = 7.5
STRENGTH = DEFAULT_STRENGTH
RSS_POLL_SECONDS = 0.005
T = TypeVar("T")


# --------------------------------------------------------------------------- small helpers
def version_of(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def max_rss_mib() -> float:
    """Peak resident set of this whole process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MIB


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synthetic_image(height: int, width: int):
    """A fixed init image for img2img: smooth colour gradients plus seeded noise."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(SEED)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 37.0)], axis=-1) * 200
    rgb += rng.normal(0, 20, size=rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- probe
def bandwidth_gbps(device, size_bytes: int = 2**30, repeats: int = 5) -> Bandwidth:
    """Host-to-device copy speed from pinned memory (best and median of `repeats`, GB/s = 1e9 B/s)."""
    import torch

    host = torch.empty(size_bytes, dtype=torch.uint8).pin_memory()
    target = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        rates.append(size_bytes / (start.elapsed_time(end) / 1000) / 1e9)
    rates.sort()
    del host, target
    torch.cuda.empty_cache()
    return Bandwidth(bytes=size_bytes, best_gbps=rates[-1], median_gbps=rates[len(rates) // 2])


def probe(payload: dict) -> Machine:
    import psutil
    import torch

    from optimized_sd.memory.device import resolve_device

    device = resolve_device(payload.get("device"))
    machine = Machine(
        device=str(device),
        device_type=device.type,
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        ram_gib=psutil.virtual_memory().total / 2**30,
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        transformers=version_of("transformers"),
        diffusers=version_of("diffusers"),
        accelerate=version_of("accelerate"),
        optimized_sd=version_of("optimized-sd"),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine = replace(machine, gpu=props.name, vram_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
        if payload.get("bandwidth"):
            machine.bandwidth = bandwidth_gbps(device)
    return machine


# --------------------------------------------------------------------------- build
def build(payload: dict) -> BenchModel:
    from optimized_sd.benchmark.model_cache import activation_ranges, ensure_model, model_config

    cached = ensure_model(payload.get("cache_dir"), payload.get("model", "sd15"), payload.get("seed", 0))
    ranges = None
    if cached.built and payload.get("check_ranges", True):
        ranges = activation_ranges(model_config(payload.get("model", "sd15")))
    return BenchModel(
        checkpoint=str(cached.checkpoint),
        tokenizer=str(cached.tokenizer),
        diffusers_config=str(cached.diffusers_config),
        built=cached.built,
        seconds=cached.seconds,
        file_bytes=cached.checkpoint.stat().st_size,
        peak_rss_mib=max_rss_mib(),
        activation_max_abs_fp32=ranges,
    )


# --------------------------------------------------------------------------- memory caps
class ResultChannel:
    """Where the result line goes: a duplicate of the worker's stdout taken at start (`open`), because a
    peer may point fd 1 at /dev/null while it runs (stable-diffusion-cpp-python silences its C library
    so), and the RSS watchdog reports from inside such a call."""

    stream: TextIO | None = None

    @classmethod
    def open(cls) -> None:
        cls.stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result, default=str), file=ResultChannel.stream or sys.stdout, flush=True)


class RssWatchdog:
    """The CPU's hard cap: samples this process' RSS every few milliseconds and, once it passes the
    budget, reports the run as out of memory and ends the process at once (as a kernel's OOM killer
    would, but with a result line). A spike shorter than the sampling interval can slip by: the run's
    peak RSS (getrusage) is checked against the budget again at the end."""

    def __init__(self, cap: CapFacts, scenario: Scenario) -> None:
        import psutil

        self.cap, self.scenario, self.process = cap, scenario, psutil.Process()
        self.limit = int((cap.budget_mib or 0) * MIB)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="rss-watchdog", daemon=True)

    def start(self) -> RssWatchdog:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def watch(self) -> None:
        while not self.stopped.wait(RSS_POLL_SECONDS):
            rss = self.process.memory_info().rss
            if rss > self.limit:
                error = f"out of memory: RSS {rss / MIB:,.0f} MiB passed the cap of {self.cap.budget_mib:,.0f} MiB"
                emit(asdict(ScenarioResult(self.scenario, ok=False, oom=True, error=error, cap=self.cap, peak_rss_mib=max_rss_mib())))
                os._exit(1)


def preload(engine: str) -> None:
    """Import what the engine's run imports, so the RSS measured before it counts the libraries."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if engine == "ours":
        import optimized_sd.pipelines.txt2img  # noqa: F401
    elif engine == "stable-diffusion.cpp":
        import stable_diffusion_cpp  # noqa: F401
    else:
        import diffusers  # noqa: F401

        if engine == "OpenVINO":
            import openvino  # noqa: F401


def cuda_context_bytes(device) -> tuple[int, int]:
    """(bytes of the device outside PyTorch's allocator, the device's total) once the CUDA context is
    up and the kernels of a first matmul, convolution and attention are loaded (lazy loading adds
    them on first use, as a run would). Other processes on the device would count too."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        a = torch.randn(1, 4, 64, 64, device=device, dtype=torch.float16)
        F.conv2d(a, torch.randn(4, 4, 3, 3, device=device, dtype=torch.float16), padding=1)
        q = a.view(1, 4, 64, 64)
        F.scaled_dot_product_attention(q, q, q)
        (q[0, 0] @ q[0, 0]).sum().item()
    del a, q
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device), total


def hold_to_budget(scenario: Scenario, device) -> tuple[CapFacts, RssWatchdog | None]:
    """Apply the scenario's cap to this process (see `benchmark.caps`); the facts say what was seen.
    Raises `BudgetTooSmall` or `BudgetAboveDevice` when no cap can stand for the budget."""
    import psutil
    import torch

    budget = parse_budget(scenario.budget) if scenario.budget else None
    if device.type == "cuda":
        context, total = cuda_context_bytes(device)
        if budget is None:
            return CapFacts(UNCAPPED, None, total / MIB, "mem_get_info", context / MIB), None
        try:
            cap = replace(cuda_cap(budget, total, context), total_source="mem_get_info")
        except BudgetTooSmall as error:
            error.facts = replace(error.facts, total_source="mem_get_info")
            raise
        torch.cuda.set_per_process_memory_fraction(cap.fraction, torch.cuda.current_device() if device.index is None else device.index)
        return cap, None
    baseline, ram = psutil.Process().memory_info().rss, psutil.virtual_memory().total
    if budget is None:
        return CapFacts(UNCAPPED, None, ram / MIB, "meminfo", baseline / MIB), None
    cap = cpu_cap(budget, ram, baseline)
    return cap, RssWatchdog(cap, scenario).start()


def after_run(cap: CapFacts, device) -> CapFacts:
    """The cap's facts with the context as it stands after the run (CUDA: it grows as kernels load)."""
    import torch

    if device.type != "cuda":
        return cap
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return replace(cap, context_after_mib=(total - free - torch.cuda.memory_reserved(device)) / MIB)


# --------------------------------------------------------------------------- scenarios
Measured = tuple[float, dict[str, StageFigures], object]  # (seconds of the run, its stages, its latents)


def stage_figures(meter) -> dict[str, StageFigures]:
    """A `MemoryMeter`'s summary of its records, typed."""
    return {stage: StageFigures(**row) for stage, row in meter.summary().items()}


def timed(device, work: Callable[[], T]) -> tuple[float, T]:
    """Seconds `work` takes, the device work it queues included (whole runs and loading; the stages
    within a run are measured by a `MemoryMeter`)."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    value = work()
    sync()
    return time.perf_counter() - start, value


def best_of(measure: Callable[[], Measured], repeat: int) -> Measured:
    """Run `measure` `repeat` times: the fastest run's times, and for each stage the highest peaks
    seen over all runs (timings vary with other load; peaks should not)."""
    runs = [measure() for _ in range(max(1, repeat))]
    total, stages, latents = min(runs, key=lambda run: run[0])
    for _, other, _ in runs:
        stages = {name: figures.with_highest_peaks(other.get(name, figures)) for name, figures in stages.items()}
    return total, stages, latents


def run_calls(calls: int, run: Callable[[], tuple[dict[str, StageFigures], object]]) -> tuple[dict[str, StageFigures], object]:
    """`calls` runs of one measured scenario (optimizedSD's `--n_iter`): their stages added together,
    and the last call's latents."""
    stages: dict[str, StageFigures] = {}
    latents = None
    for _ in range(calls):
        figures, latents = run()
        stages = {name: stages[name].then(f) if name in stages else f for name, f in figures.items()}
    return stages, latents


def measure_calls(device, scenario: Scenario, repeat: int, call: Callable[[], tuple[dict[str, StageFigures], object]]) -> Measured:
    """The scenario's `n_iter` calls timed as one run, `repeat` times (`best_of`)."""

    def measured() -> Measured:
        seconds, (stages, latents) = timed(device, lambda: run_calls(scenario.n_iter, call))
        return seconds, stages, latents

    return best_of(measured, repeat)


def collect_warnings() -> list[str]:
    """A list that gathers the engine's warnings (logged by `optimized_sd`) from now on."""
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logging.getLogger("optimized_sd").addHandler(Collect(level=logging.WARNING))
    return warnings


def our_request(scenario: Scenario):
    """The scenario as our engine's request (img2img: from a synthetic image)."""
    from optimized_sd.pipelines.diffusion import GenerationRequest

    init = synthetic_image(scenario.height, scenario.width) if scenario.kind == "img2img" else None
    return GenerationRequest(
        prompts=[PROMPT] * scenario.batch,
        steps=scenario.steps,
        scale=SCALE,
        sampler="ddim",
        seed=SEED,
        height=scenario.height,
        width=scenario.width,
        init_image=init,
        strength=STRENGTH,
    )


def plan_facts(plan) -> PlanFacts:
    """What the planner decided for the run, in MiB."""
    return PlanFacts(
        mode=plan.mode,
        reason=plan.reason,
        vae_tiling=plan.vae_tiling,
        budget_mib=plan.budget / MIB if plan.budget else None,
        estimates_mib={mode: value / MIB for mode, value in plan.estimates.items()},
        unet_batch=plan.unet_batch,
    )


def footprint_of(pipe) -> Footprint:
    """The loaded model's weight sizes, as the planner saw them."""
    fp = pipe.memory.sizes
    return Footprint(
        dtype_bytes=pipe.dtype_bytes,
        text_encoder=fp.text_encoder,
        unet=fp.unet,
        unet_halves=list(fp.unet_halves),
        largest_block_pair=fp.largest_block_pair,
        vae_encoder=fp.vae_encoder,
        vae_decoder=fp.vae_decoder,
        total=fp.total,
        family=fp.family,
    )


def run_ours(task: ScenarioTask, scenario: Scenario, device, budget: int | None = None) -> ScenarioResult:
    import torch

    from optimized_sd.pipelines.load_options import LoadOptions

    warnings = collect_warnings()
    request = our_request(scenario)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401  imported before the clock, as diffusers is

    def load():
        options = LoadOptions(
            device=str(device),
            precision=task.precision,
            memory=scenario.mode,
            vram_budget=budget,
            attention=task.attention,
            tokenizer=task.tokenizer,
            weights=task.weights,
            ram_budget=task.ram_budget,
        )
        pipe = options.load(task.checkpoint)
        pipe.prepare(request)  # place the weights now, so that loading is timed here
        return pipe

    load_seconds, pipe = timed(device, load)
    rss_after_load = current_rss_mib()
    for _ in range(task.warmup):
        pipe.generate(replace(request, steps=min(scenario.steps, 2)))

    def call() -> tuple[dict[str, StageFigures], object]:
        latents = pipe.generate(request).latents  # each call's stages replace the previous call's in the meter
        return stage_figures(pipe.meter), latents

    total, stages, latents = measure_calls(device, scenario, task.repeat, call)
    return ScenarioResult(
        scenario=scenario,
        ok=True,
        mode_used=pipe.mode,
        load_seconds=load_seconds,
        total_seconds=total,
        stages=stages,
        rss_after_load_mib=rss_after_load,
        finite=bool(torch.isfinite(latents).all()),
        warnings=warnings,
        plan=plan_facts(pipe.plan),
        footprint=footprint_of(pipe),
    )


def place_peer(pipe, peer: str, device) -> None:
    """Put a diffusers pipeline on the device the way the peer's name says."""
    import torch

    if peer in ("diffusers", "diffusers-attention-slicing", "diffusers-vae-slicing"):
        pipe.to(device)
        if peer == "diffusers-attention-slicing":
            pipe.enable_attention_slicing()
        if peer == "diffusers-vae-slicing":  # decode one image at a time, in overlapping tiles
            pipe.vae.enable_slicing()
            pipe.vae.enable_tiling()
    elif peer == "diffusers-model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif peer == "diffusers-sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
    elif peer in ("diffusers-group-offload", "diffusers-group-offload-leaf"):
        level = dict(offload_type="leaf_level") if peer.endswith("-leaf") else dict(offload_type="block_level", num_blocks_per_group=1)
        options = dict(onload_device=device, offload_device=torch.device("cpu"), use_stream=True, **level)
        if hasattr(pipe, "enable_group_offload"):
            pipe.enable_group_offload(**options)
        else:  # older diffusers: per model
            from diffusers.hooks import apply_group_offloading

            for component in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                if component is not None:
                    apply_group_offloading(component, **options)
    else:
        raise UserError(f"unknown peer {peer!r}")


def diffusers_pipeline_name(config_folder: str, img2img: bool) -> str:
    """The family's diffusers pipeline, as the config folder's model_index.json names it
    (StableDiffusionPipeline, StableDiffusionXLPipeline), or its img2img sibling."""
    name = json.loads((Path(config_folder) / "model_index.json").read_text())["_class_name"]
    return name.replace("Pipeline", "Img2ImgPipeline") if img2img else name


def diffusers_class(task: ScenarioTask, img2img: bool):
    """The family's diffusers pipeline class, with diffusers' own logging quietened."""
    try:
        import diffusers
        from diffusers.utils import logging as diffusers_logging
    except ImportError as error:
        raise UserError(f"diffusers is not importable: {error}") from None
    diffusers_logging.set_verbosity_error()
    return getattr(diffusers, diffusers_pipeline_name(task.diffusers_config, img2img))


class DiffusersStages:
    """Hooks that mark our stages in a diffusers pipeline, which has none of its own: text until the
    first UNet call (img2img: text, then the VAE encode), and the UNet calls counted as steps."""

    def __init__(self, pipe, meter, img2img: bool) -> None:
        self.meter, self.img2img = meter, img2img
        self.unet_calls, self.in_unet = 0, False
        self.hooks = [pipe.unet.register_forward_pre_hook(self.before_unet)]
        if img2img:
            self.hooks.append(pipe.vae.encoder.register_forward_pre_hook(self.before_encoder))
            self.hooks.append(pipe.vae.quant_conv.register_forward_hook(self.after_encoder))

    def before_encoder(self, module, args) -> None:
        self.meter.mark("text")

    def after_encoder(self, module, args, output) -> None:
        self.meter.mark("vae_encode")

    def before_unet(self, module, args) -> None:
        if not self.in_unet:
            self.meter.mark("vae_encode" if self.img2img else "text")
            self.in_unet = True
        self.unet_calls += 1

    def reset(self) -> None:
        """Before each call: no UNet step seen yet, no records."""
        self.unet_calls, self.in_unet = 0, False
        self.meter.records.clear()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def diffusers_options(scenario: Scenario, steps: int, init) -> dict:
    """The keyword arguments of one diffusers pipeline call for the scenario, returning latents."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(scenario.batch)]
    options = dict(
        prompt=[PROMPT] * scenario.batch,
        num_inference_steps=steps,
        guidance_scale=SCALE,
        generator=generators,
        output_type="latent",
    )
    if init is not None:
        options.update(image=init, strength=STRENGTH)
    else:
        options.update(height=scenario.height, width=scenario.width)
    return options


def run_diffusers(task: ScenarioTask, scenario: Scenario, device) -> ScenarioResult:
    import torch

    img2img = scenario.kind == "img2img"
    cls = diffusers_class(task, img2img)
    dtype = getattr(torch, compute_dtype_name(device.type, task.precision))

    def load():
        pipe = cls.from_single_file(task.checkpoint, config=task.diffusers_config, local_files_only=True, torch_dtype=dtype)
        place_peer(pipe, scenario.mode, device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    load_seconds, pipe = timed(device, load)
    rss_after_load = current_rss_mib()
    init = synthetic_image(scenario.height, scenario.width) if img2img else None
    from optimized_sd.memory.report import MemoryMeter

    meter = MemoryMeter(device)
    stages_marked = DiffusersStages(pipe, meter, img2img)

    def generate(steps: int):
        options = diffusers_options(scenario, steps, init)
        stages_marked.reset()
        with meter.marked():
            latents = pipe(**options).images
            meter.mark("unet", steps=stages_marked.unet_calls)
            with torch.inference_mode():
                images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
                pipe.image_processor.postprocess(images, output_type="pil")
            meter.mark("vae_decode")
        return latents

    for _ in range(task.warmup):
        generate(min(scenario.steps, 2))

    def call() -> tuple[dict[str, StageFigures], object]:
        latents = generate(scenario.steps)
        return stage_figures(meter), latents

    total, stages, latents = measure_calls(device, scenario, task.repeat, call)
    stages_marked.remove()
    return ScenarioResult(
        scenario=scenario,
        ok=True,
        mode_used=scenario.mode,
        load_seconds=load_seconds,
        total_seconds=total,
        stages=stages,
        rss_after_load_mib=rss_after_load,
        finite=bool(torch.isfinite(latents).all()),
    )


def run_engine(task: ScenarioTask, scenario: Scenario, device, cap: CapFacts) -> ScenarioResult:
    """The scenario in its engine; ours plans for what the cap leaves (None: the free memory)."""
    if scenario.engine == "ours":
        return run_ours(task, scenario, device, budget=cap.allocatable_bytes)
    if scenario.engine == "stable-diffusion.cpp":
        from optimized_sd.benchmark.cpu_peers import run_sdcpp

        return run_sdcpp(task, scenario, device)
    if scenario.engine == "OpenVINO":
        from optimized_sd.benchmark.cpu_peers import run_openvino

        return run_openvino(task, scenario, device)
    return run_diffusers(task, scenario, device)


def run_scenario(payload: dict) -> ScenarioResult:
    """One scenario under its memory cap. Not completing for lack of memory is a result (`oom`), not
    a failure of the harness."""
    import torch

    from optimized_sd.memory.device import resolve_device

    task = from_json(ScenarioTask, payload)
    scenario = Scenario.from_dict(payload["scenario"])
    device = resolve_device(task.device)
    preload(scenario.engine)
    load_before = os.getloadavg()[0]
    try:
        cap, watchdog = hold_to_budget(scenario, device)
    except BudgetTooSmall as error:
        return ScenarioResult(scenario, ok=False, oom=True, cap=error.facts, error=f"does not fit: {error}", peak_rss_mib=max_rss_mib())
    except BudgetAboveDevice as error:
        raise UserError(f"--budget {scenario.budget}: {error}") from None
    try:
        result = run_engine(task, scenario, device, cap)
    except torch.OutOfMemoryError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "CUDA out of memory"
        error = f"out of memory: {first_line[:200]}"
        return ScenarioResult(scenario, ok=False, oom=True, cap=after_run(cap, device), error=error, peak_rss_mib=max_rss_mib())
    except OutOfMemoryBudget as error:
        return ScenarioResult(scenario, ok=False, oom=True, cap=after_run(cap, device), user_error=str(error), peak_rss_mib=max_rss_mib())
    finally:
        if watchdog is not None:
            watchdog.stop()
    peak_rss = max_rss_mib()
    result = replace(
        result.with_stage_totals(),
        cap=after_run(cap, device),
        device=str(device),
        dtype=compute_dtype_name(device.type, task.precision),
        peak_rss_mib=peak_rss,
        host_load=[load_before, os.getloadavg()[0]],  # other work on the machine skews timings
    )
    if cap.kind == CPU_RSS and cap.budget_mib is not None and peak_rss > cap.budget_mib:
        error = f"out of memory: peak RSS {peak_rss:,.0f} MiB passed the cap of {cap.budget_mib:,.0f} MiB between two samples"
        return replace(result, ok=False, oom=True, error=error)
    return result


TASKS = {"probe": probe, "build": build, "scenario": run_scenario}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        payload = json.loads(argv[0])
        task = TASKS[payload["task"]]
    except (IndexError, ValueError, KeyError):
        print("usage: python -m optimized_sd.benchmark.worker '{\"task\": \"probe|build|scenario\", ...}'", file=sys.stderr)
        return 2
    try:
        result = {"ok": True, **asdict(task(payload))}
    except UserError as error:
        result = {"ok": False, "user_error": str(error)}
    except Exception as error:  # reported as a failed row, with the traceback's tail for the log
        result = {
            "ok": False,
            "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}",
            "traceback": traceback.format_exc()[-3000:],
            "peak_rss_mib": max_rss_mib(),
        }
    emit(result)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    ResultChannel.open()
    sys.exit(main())

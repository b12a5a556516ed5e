"""Typed benchmark results: what a worker measures, what results.json holds and what the report reads.

Pure Python (no torch): the `bench` command and `--render` load them without touching a model. A
results.json is `asdict` of a `BenchRecord` (each scenario also carries its name, engine and group,
so the file reads on its own); `BenchRecord.from_json` reads it back, the files of earlier versions
included. Keys this version does not know (such as the worker's `ok` flag that earlier versions saved
beside the machine and model facts) are dropped on reading."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from optimized_sd.benchmark.caps import CapFacts
from optimized_sd.benchmark.scenarios import Scenario

T = TypeVar("T")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(kind: Any, value: Any) -> Any:
    """`value` (parsed JSON) as the type `kind`: dataclasses, `X | None`, `list[X]`, `dict[str, X]`."""
    if value is None:
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return decode(next(a for a in args if a is not type(None)), value)
    if origin is list:
        return [decode(args[0], item) for item in value]
    if origin is dict:
        return {key: decode(args[1], item) for key, item in value.items()}
    if kind is Scenario:
        return Scenario.from_dict(value)
    if dataclasses.is_dataclass(kind):
        return from_json(kind, value)
    return value


def from_json(cls: type[T], data: dict) -> T:
    """An instance of the dataclass `cls` from its JSON object; unknown keys are dropped."""
    hints = field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: decode(hints[key], value) for key, value in data.items() if key in known})


@dataclass
class Bandwidth:
    """Host-to-device copy speed from pinned memory (GB/s = 1e9 B/s)."""

    bytes: int
    best_gbps: float
    median_gbps: float


@dataclass
class Machine:
    """The machine and software a run measured."""

    device: str
    device_type: str
    cpu: str = "?"
    cpu_count: int | None = None
    torch_threads: int | None = None
    ram_gib: float = 0.0
    python: str | None = None
    platform: str | None = None
    torch: str | None = None
    transformers: str | None = None
    diffusers: str | None = None
    accelerate: str | None = None
    optimized_sd: str | None = None
    gpu: str | None = None
    vram_gib: float | None = None
    cuda: str | None = None
    bandwidth: Bandwidth | None = None


@dataclass
class BenchModel:
    """The cached benchmark model: its files, whether this run built it, and how it was made."""

    checkpoint: str
    tokenizer: str
    diffusers_config: str
    built: bool
    seconds: float
    file_bytes: int
    peak_rss_mib: float = 0.0
    activation_max_abs_fp32: dict[str, float] | None = None  # per stage, measured when the model is built
    description: str = ""


@dataclass
class ScenarioTask:
    """How every scenario of a run is measured: the runner sends it, with the scenario, to each
    scenario's worker process."""

    device: str
    checkpoint: str
    tokenizer: str
    diffusers_config: str
    precision: str = "autocast"
    attention: str = "sdpa"
    weights: str | None = None
    ram_budget: str | None = None  # our engine's --ram-budget
    warmup: int = 0
    repeat: int = 1

    def payload(self, scenario: Scenario) -> dict:
        """The worker's JSON payload for one scenario."""
        return {"task": "scenario", **asdict(self), "scenario": scenario.to_dict()}


@dataclass
class Settings:
    """What every scenario of a run shares."""

    prompt: str
    seed: int
    scale: float
    strength: float
    sampler: str
    steps: int
    precision: str
    dtype: str
    attention: str
    warmup: int
    repeat: int
    timeout_s: float
    weights: str | None = None  # our engine's weight storage, when --weights was given
    ram_budget: str | None = None  # our engine's host-RAM budget, when --ram-budget was given


@dataclass
class StageFigures:
    """One pipeline stage of a run: total seconds and UNet calls, and its peaks (MiB)."""

    seconds: float = 0.0
    steps: int = 0
    peak_allocated_mib: float = 0.0
    peak_reserved_mib: float = 0.0
    peak_rss_mib: float = 0.0
    peak_rss_anon_mib: float = 0.0  # of the RSS: anonymous, file-backed (`memory.report.rss_split`), and pinned bytes
    peak_rss_file_mib: float = 0.0
    pinned_mib: float = 0.0

    @property
    def seconds_per_step(self) -> float | None:
        return self.seconds / self.steps if self.steps else None

    def then(self, other: StageFigures) -> StageFigures:
        """This stage and the same stage of a later call together: times and steps add, peaks are the higher."""
        return dataclasses.replace(self.with_highest_peaks(other), seconds=self.seconds + other.seconds, steps=self.steps + other.steps)

    def with_highest_peaks(self, other: StageFigures) -> StageFigures:
        """These times with the higher of each peak: timings vary with other load, peaks should not."""
        return dataclasses.replace(
            self,
            peak_allocated_mib=max(self.peak_allocated_mib, other.peak_allocated_mib),
            peak_reserved_mib=max(self.peak_reserved_mib, other.peak_reserved_mib),
            peak_rss_mib=max(self.peak_rss_mib, other.peak_rss_mib),
            peak_rss_anon_mib=max(self.peak_rss_anon_mib, other.peak_rss_anon_mib),
            peak_rss_file_mib=max(self.peak_rss_file_mib, other.peak_rss_file_mib),
            pinned_mib=max(self.pinned_mib, other.pinned_mib),
        )


@dataclass
class PlanFacts:
    """What our planner decided for a run, and its estimates per mode (MiB)."""

    mode: str
    reason: str
    vae_tiling: bool
    budget_mib: float | None
    estimates_mib: dict[str, float]
    unet_batch: int | None = None  # the UNet micro-batch (None: the whole CFG batch)


@dataclass
class Footprint:
    """Weight bytes of our pipeline's parts, as the planner sees them."""

    dtype_bytes: int
    text_encoder: int
    unet: int
    unet_halves: list[int]
    largest_block_pair: int
    vae_encoder: int
    vae_decoder: int
    total: int
    family: str = "sd1"  # whose planner constants apply (files from before this field: SD 1.5 runs)


@dataclass
class ScenarioResult:
    """One scenario's row: its measurements when `ok`, else why it failed (`user_error`, `error`).
    `oom`: it did not complete for lack of memory (out of memory under its cap, the planner finding
    no mode that fits, a budget filled by the context alone, or skipped after running out of memory
    at a larger budget), which the frontier reports as "does not complete" rather than as a failure."""

    scenario: Scenario
    ok: bool
    oom: bool = False
    cap: CapFacts | None = None
    error: str | None = None
    user_error: str | None = None
    traceback: str | None = None
    stderr_tail: str | None = None
    mode_used: str | None = None
    device: str | None = None
    dtype: str | None = None
    load_seconds: float = 0.0
    total_seconds: float = 0.0
    stages: dict[str, StageFigures] = field(default_factory=dict)
    rss_after_load_mib: float = 0.0
    finite: bool = True
    warnings: list[str] = field(default_factory=list)
    plan: PlanFacts | None = None
    footprint: Footprint | None = None
    # Summaries of `stages` (kept in the file so that it reads without this code):
    unet_steps: int = 0
    seconds_per_step: float | None = None
    text_seconds: float = 0.0
    vae_decode_seconds: float = 0.0
    vae_encode_seconds: float = 0.0
    vae_seconds: float = 0.0
    seconds_per_image: float = 0.0
    peak_allocated_mib: float = 0.0
    peak_reserved_mib: float = 0.0
    peak_stage_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0  # the whole process (getrusage), loading included
    host_load: list[float] | None = None  # 1-minute load average before and after the run

    @property
    def failure(self) -> str:
        return self.user_error or self.error or "unknown error"

    def with_stage_totals(self) -> ScenarioResult:
        """This result with the per-run summaries of its stages filled in."""
        stages = self.stages
        unet = stages.get("unet", StageFigures())
        decode_s = stages.get("vae_decode", StageFigures()).seconds
        encode_s = stages.get("vae_encode", StageFigures()).seconds
        return dataclasses.replace(
            self,
            unet_steps=unet.steps,
            seconds_per_step=unet.seconds_per_step,
            text_seconds=stages.get("text", StageFigures()).seconds,
            vae_decode_seconds=decode_s,
            vae_encode_seconds=encode_s,
            vae_seconds=decode_s + encode_s,
            seconds_per_image=self.total_seconds / self.scenario.images,
            peak_allocated_mib=max((s.peak_allocated_mib for s in stages.values()), default=0.0),
            peak_reserved_mib=max((s.peak_reserved_mib for s in stages.values()), default=0.0),
            peak_stage_rss_mib=max((s.peak_rss_mib for s in stages.values()), default=0.0),
        )

    def to_json(self) -> dict:
        return {**asdict(self), "scenario": self.scenario.to_dict()}

    @classmethod
    def from_json(cls, data: dict) -> ScenarioResult:
        return from_json(cls, data)


@dataclass
class BenchRecord:
    """A whole `optimized-sd bench` run: what results.json holds and results.md shows."""

    command: str
    date: str
    started: str
    wall_seconds: float
    machine: Machine
    model: BenchModel
    settings: Settings
    budget: str | None = None
    notes: list[str] = field(default_factory=list)
    results: list[ScenarioResult] = field(default_factory=list)
    tool: str = "optimized-sd bench"
    chart: str | None = None  # the chart's file name beside results.md, when one was drawn
    chart_note: str | None = None  # why there is no chart
    frontier_chart: str | None = None  # s/image against budget (frontier.png, or frontier.svg drawn without matplotlib)
    partial: bool = False  # the run stopped before every scenario had finished

    @property
    def cuda(self) -> bool:
        return self.machine.device_type == "cuda"

    def to_json(self) -> dict:
        return {**asdict(self), "results": [result.to_json() for result in self.results]}

    @classmethod
    def from_json(cls, data: dict) -> BenchRecord:
        return from_json(cls, data)

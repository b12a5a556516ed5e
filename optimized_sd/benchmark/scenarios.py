"""Benchmark scenarios as data: what to run (ours in a memory mode, or a diffusers peer), at which size,
batch and step count, and the rules that turn the command's flags into a list of them.

Pure Python (no torch): the `bench` command imports it to check flags before any model work."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass

from optimized_sd.benchmark.caps import NO_BUDGET, largest_first, parse_budgets
from optimized_sd.errors import UserError
from optimized_sd.memory.modes import MODES

KINDS = ("txt2img", "img2img")
OUR_MODES = MODES  # the memory mode table's names, fastest first
AUTO = "auto"  # the planner picks (by free memory, or by --budget)


@dataclass(frozen=True)
class Peer:
    """An engine configuration we measure against. `engine`: whose code runs it (diffusers,
    stable-diffusion.cpp, OpenVINO); `needs`: the importable packages it runs on, each with the pip
    name to install (checked before any process starts; a missing one is a one-line note);
    `devices`: the device types it runs on."""

    name: str
    description: str
    engine: str = "diffusers"
    needs: tuple[tuple[str, str], ...] = (("diffusers", "diffusers"),)
    devices: tuple[str, ...] = ("cuda", "cpu")
    models: tuple[str, ...] = ("sd15", "sd2", "sdxl", "tiny", "tiny-sd2", "tiny-sdxl")  # the benchmark models it can load

    @property
    def cuda_only(self) -> bool:
        return self.devices == ("cuda",)


DIFFUSERS = (("diffusers", "diffusers"),)
WITH_ACCELERATE = DIFFUSERS + (("accelerate", "accelerate"),)


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("diffusers", "StableDiffusionPipeline, everything on the device (the baseline)"),
        Peer("diffusers-model-offload", "enable_model_cpu_offload", needs=WITH_ACCELERATE, devices=("cuda",)),
        Peer("diffusers-sequential-offload", "enable_sequential_cpu_offload", needs=WITH_ACCELERATE, devices=("cuda",)),
        Peer("diffusers-attention-slicing", "enable_attention_slicing()"),
        Peer(
            "diffusers-group-offload",
            "enable_group_offload(block_level, 1 block per group, use_stream=True)",
            devices=("cuda",),
        ),
        Peer(
            "diffusers-group-offload-leaf",
            "enable_group_offload(leaf_level, use_stream=True): every leaf module its own group, prefetched on a stream",
            devices=("cuda",),
        ),
        Peer("diffusers-vae-slicing", "everything on the device, vae.enable_slicing() and vae.enable_tiling()"),
        Peer(
            "sdcpp",
            "stable-diffusion.cpp (stable-diffusion-cpp-python, CPU build), the same single-file checkpoint, f16 weights",
            engine="stable-diffusion.cpp",
            needs=(("stable_diffusion_cpp", "stable-diffusion-cpp-python"),),
            devices=("cpu",),
            models=("sd15",),  # it recognises SD 1.5 by its shapes: the tiny model is not one
        ),
        Peer(
            "openvino",
            "OpenVINO runtime: diffusers' pipeline with its text encoder, UNet and VAE decoder converted by openvino.convert_model",
            engine="OpenVINO",
            needs=DIFFUSERS + (("openvino", "openvino"),),
            devices=("cpu",),
        ),
    )
}
FRONTIER_PEERS = ("diffusers", "diffusers-attention-slicing", "diffusers-vae-slicing", "diffusers-model-offload", "diffusers-group-offload",
                  "diffusers-sequential-offload", "sdcpp", "openvino")
BASELINE_PEER = "diffusers"

# Which peers do the same job as each of our modes (each compared beside the baseline).
CLOSEST_PEERS: dict[str, tuple[str, ...]] = {
    "full": (),
    "turbo": ("diffusers-model-offload",),
    "split": ("diffusers-model-offload",),
    "stream": ("diffusers-group-offload", "diffusers-group-offload-leaf", "diffusers-sequential-offload"),
}
# The seed workload of optimizedSD's users: `--n_samples 10 --n_iter 2 --turbo` at 512x512, under a
# 2.4 GB cap (the planner chooses the UNet micro-batch), against uncapped `full` at the same batch.
SEED_WORKLOAD = {
    "sizes": "512", "batches": "10", "n_iter": 2, "kinds": "txt2img", "modes": "full", "peers": "none", "mode": "turbo", "budget": "2.4GB",
}

QUICK = {"sizes": "256", "steps": 2, "modes": "full,stream", "peers": "diffusers", "kinds": "txt2img", "batches": "1"}
DEFAULT_STEPS = {"cuda": 10, "cpu": 2}


@dataclass(frozen=True)
class Scenario:
    """One measured run, in its own process. `mode` is one of our memory modes (or `auto`) or a
    peer's name. `budget` (e.g. "2GB"): the run is held to that much memory (a hard cap, see
    `benchmark.caps`), and our modes plan for it; None: no cap. `n_iter`: calls of `batch` images
    each in one measured run (optimizedSD's `--n_iter`)."""

    kind: str
    height: int
    width: int
    batch: int
    steps: int
    mode: str
    budget: str | None = None
    n_iter: int = 1

    @property
    def engine(self) -> str:
        return PEERS[self.mode].engine if self.mode in PEERS else "ours"

    @property
    def images(self) -> int:
        return self.batch * self.n_iter

    @property
    def size(self) -> str:
        return str(self.width) if self.width == self.height else f"{self.width}x{self.height}"

    @property
    def group(self) -> str:
        """Scenarios that are compared with each other share a group: same work, different engine/mode."""
        iterations = f"x{self.n_iter}" if self.n_iter > 1 else ""
        return f"{self.kind}-{self.size}-b{self.batch}{iterations}"

    @property
    def name(self) -> str:
        budget = f"-budget{self.budget}" if self.budget else ""
        return f"{self.group}-{self.mode}{budget}"

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.n_iter == 1:
            del data["n_iter"]  # as files written before it existed
        return {**data, "name": self.name, "engine": self.engine, "group": self.group}

    @classmethod
    def from_dict(cls, data: dict) -> Scenario:
        return cls(**{k: data[k] for k in ("kind", "height", "width", "batch", "steps", "mode", "budget")}, n_iter=data.get("n_iter", 1))


def split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512,768' or '512x768' (width x height) -> [(height, width)]; multiples of 8, at least 64."""
    sizes = []
    for part in split_list(text):
        try:
            width, height = (int(v) for v in part.lower().split("x")) if "x" in part.lower() else (int(part), int(part))
        except ValueError:
            raise UserError(f"cannot read the size {part!r}; write sizes like 512,768 or 512x768") from None
        for value in (width, height):
            if value < 64 or value % 8:
                raise UserError(f"size {part}: each side must be a multiple of 8 and at least 64")
        sizes.append((height, width))
    if not sizes:
        raise UserError("--sizes is empty; give e.g. 512 or 512,768")
    return sizes


def parse_positive_ints(text: str, flag: str) -> list[int]:
    values = []
    for part in split_list(text):
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"{flag}: {part!r} is not a whole number") from None
        if value < 1:
            raise UserError(f"{flag}: {value} must be at least 1")
        values.append(value)
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def parse_names(text: str, known: tuple[str, ...] | list[str], what: str, flag: str) -> list[str]:
    """Comma list checked against `known`; 'all' means every one, 'none' (or empty) none."""
    names = split_list(text)
    if names in (["all"],):
        return list(known)
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"{flag}: unknown {what} {', '.join(repr(n) for n in unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


@dataclass
class Selection:
    """The scenarios to run, and what was left out and why (said in the output, not silently)."""

    scenarios: list[Scenario]
    notes: list[str]


def missing_package(peer: Peer, installed: Callable[[str], bool]) -> str | None:
    """The first package `peer` needs that is not installed, as its pip name; None when all are."""
    return next((pip_name for module, pip_name in peer.needs if not installed(module)), None)


def runnable_peers(
    names: list[str], device_type: str, installed: Callable[[str], bool], model: str = "sd15"
) -> tuple[list[str], list[str]]:
    """The peers among `names` this device and these packages can run, and a one-line note for what
    was left out: each peer for another device, diffusers' configurations together, each other
    peer whose package is missing."""
    notes: list[str] = []
    on_device = []
    for name in names:
        devices = PEERS[name].devices
        if device_type not in devices:
            notes.append(f"{name}: needs a {' or '.join(d.upper() for d in devices)} device, skipped on {device_type}")
        elif model not in PEERS[name].models:
            notes.append(f"{name}: runs the {' or '.join(PEERS[name].models)} model only, skipped with --model {model}")
        else:
            on_device.append(name)
    if on_device and not installed("diffusers"):
        others = [name for name in on_device if DIFFUSERS[0] not in PEERS[name].needs]
        done = "ran ours alone" if not others else f"ran {', '.join(others)} beside ours"
        notes.append(f"diffusers is not installed: {done} (pip install diffusers accelerate to compare)")
        on_device = others
    runnable = []
    for name in on_device:
        missing = missing_package(PEERS[name], installed)
        if missing:
            notes.append(f"{name}: {missing} is not installed, skipped (pip install {missing})")
        else:
            runnable.append(name)
    return runnable, notes


def work_scenarios(work: dict, modes: list[str], peers: list[str], budgets: list[str]) -> list[Scenario]:
    """One piece of work (kind, size, batch, steps) in each of our modes, then by each peer: plain runs
    without budgets, else `auto` and every peer under each budget."""
    scenarios = [Scenario(mode=mode, **work) for mode in modes]
    if not budgets:
        scenarios += [Scenario(mode=name, **work) for name in peers]
    for each in budgets:
        cap = None if each == NO_BUDGET else each
        scenarios += [Scenario(mode=name, budget=cap, **work) for name in (AUTO, *peers)]
    return scenarios


def only_matching(scenarios: list[Scenario], only: str) -> list[Scenario]:
    """The scenarios whose name matches one of `only`'s globs; a glob that matches none is a mistake."""
    patterns = split_list(only)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s.name, p) for s in scenarios)]
    if unmatched:
        listed = ", ".join(s.name for s in scenarios[:12]) + (" ..." if len(scenarios) > 12 else "")
        raise UserError(f"--only: no scenario named {', '.join(repr(p) for p in unmatched)}; the flags give: {listed}")
    return [s for s in scenarios if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def select_scenarios(
    *,
    kinds: str,
    sizes: str,
    batches: str,
    steps: int,
    modes: str,
    peers: str,
    device_type: str,
    budget: str | None = None,
    only: str | None = None,
    n_iter: int = 1,
    model: str = "sd15",
    installed: Callable[[str], bool] | None = None,
    diffusers_available: bool = True,
    accelerate_available: bool = True,
) -> Selection:
    """The cross product kinds x sizes x batches x (our modes + peers), filtered by what the device and
    the installed packages can run, then by `only` (comma-separated name globs).

    With `budget` (a comma list, `none` for no cap) the work also runs as a frontier: for each budget,
    roomiest first, ours in `auto` and every peer under that cap (`none`: uncapped, named as a plain
    run). `installed(module)` says whether a package is importable (default: diffusers and accelerate
    as the two flags say, every other package present)."""
    if installed is None:
        flags = {"diffusers": diffusers_available, "accelerate": accelerate_available}
        installed = lambda module: flags.get(module, True)  # noqa: E731
    kind_list = parse_names(kinds, KINDS, "kind", "--kinds")
    if not kind_list:
        raise UserError("--kinds is empty; give txt2img, img2img or both")
    size_list = parse_sizes(sizes)
    batch_list = parse_positive_ints(batches, "--batch")
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if n_iter < 1:
        raise UserError("--n_iter must be at least 1")
    mode_list = parse_names(modes, OUR_MODES + (AUTO,), "memory mode", "--modes")
    peer_list = parse_names(peers, tuple(PEERS), "peer", "--peers")
    budget_list = largest_first(parse_budgets(budget)) if budget is not None else []
    peer_list, notes = runnable_peers(peer_list, device_type, installed, model)
    scenarios = []
    for kind in kind_list:
        for height, width in size_list:
            for batch in batch_list:
                work = dict(kind=kind, height=height, width=width, batch=batch, steps=steps, n_iter=n_iter)
                scenarios += work_scenarios(work, mode_list, peer_list, budget_list)
    scenarios = list(dict.fromkeys(scenarios))
    if only:
        scenarios = only_matching(scenarios, only)
    if not scenarios:
        raise UserError("no scenario to run: give at least one of --modes or --peers")
    return Selection(scenarios, notes)


# --------------------------------------------------------------------------- owed GPU checks
@dataclass(frozen=True)
class DeviceCheck:
    """A GPU figure an issue owes, as one command for `benchmarks/device_run.sh wave4` (run under the lease's clock,
    at most `seconds`). `argv` follows the Python executable: a benchmark script or `-m optimized_sd.cli ...`.
    `tag` groups the checks a lease may run alone (`flux`: needs the 33 GB Flux.1 dev bench model; `sd`)."""

    name: str
    issue: int
    tag: str
    figure: str  # what it measures, and the target it is held to
    argv: tuple[str, ...]
    seconds: int


FLUX_GPU = ("benchmarks/flux_cpu.py", "ours", "--device", "cuda", "--size", "1024", "--steps", "4", "--cap", "100", "--timeout", "500")
CN_GPU = ("benchmarks/controlnet_cost.py", "--device", "cuda", "--rounds", "1", "--steps", "10")
OWED_GPU_CHECKS: tuple[DeviceCheck, ...] = (
    DeviceCheck("flux-dev-1024-stream", 23, "flux",
                "allocated while sampling <= 0.5 GiB; s/step <= 1.15x max(full's s/step, link_bound_s_per_step)",
                (*FLUX_GPU, "--memory", "stream"), 240),
    DeviceCheck("flux-dev-1024-full", 23, "flux", "the resident step's compute time (the other term of the link bound)",
                (*FLUX_GPU, "--memory", "full"), 200),
    DeviceCheck("flux-dev-1024-stream-fp8", 23, "flux", "fp8 stream s/step <= 0.6x bf16 stream's where the link is the bound",
                (*FLUX_GPU, "--memory", "stream", "--weights", "fp8"), 200),
    DeviceCheck("flux-dev-1024-diffusers-group-leaf", 23, "flux",
                "diffusers' leaf-level group offload with streams: ours stream >= 2.5x faster at no more VRAM",
                ("benchmarks/flux_cpu.py", "diffusers", "--device", "cuda", "--size", "1024", "--steps", "4", "--offload", "group-leaf",
                 "--cap", "100", "--timeout", "500"), 300),
    DeviceCheck("flux-dev-1024-auto-4GB", 23, "flux", "auto --vram-budget 4GB, the whole pipeline with T5, completes",
                (*FLUX_GPU, "--memory", "auto", "--vram-budget", "4GB"), 240),
    DeviceCheck("sd15-512-stream-group-leaf", 23, "sd", "the SD 1.5 stream row beside diffusers' leaf-level group offload",
                ("-m", "optimized_sd.cli", "bench", "--device", "cuda", "--model", "sd15", "--sizes", "512", "--steps", "10",
                 "--warmup", "1", "--kinds", "txt2img", "--modes", "stream", "--peers", "diffusers-group-offload-leaf",
                 "--label", "gpu", "--update", "--out", "/tmp/device-results"), 120),
    DeviceCheck("controlnet-sd15-512-stream", 27, "sd", "SD 1.5 + ControlNet 512 stream <= 0.7 GB allocated",
                (*CN_GPU, "--model", "sd15", "--size", "512", "--memory", "stream"), 120),
    DeviceCheck("controlnet-sdxl-1024-stream", 27, "sd", "SDXL + ControlNet 1024 stream <= 0.8 GB allocated, the decode tiled",
                (*CN_GPU, "--model", "sdxl", "--size", "1024", "--memory", "stream"), 240),
    DeviceCheck("hires-sd15-512-to-1024-2GB", 27, "sd", "hires fix 512 -> 1024 SD 1.5 planned for 2 GB completes (peak allocated <= 2 GB)",
                (*CN_GPU, "--model", "sd15", "--size", "512", "--memory", "auto", "--configs", "hires", "--hr-scale", "2",
                 "--vram-budget", "2GB"), 120),
    DeviceCheck("zimage-turbo-1024-auto-2GB", 24, "zimage",
                "Z-Image-Turbo 1024 whole pipeline planned for 2 GB completes (peak allocated <= 2 GiB)",
                ("benchmarks/zimage_cpu.py", "ours", "--device", "cuda", "--precision", "bf16", "--size", "1024", "--steps", "8",
                 "--memory", "auto", "--vram-budget", "2GB", "--cap", "100", "--timeout", "500"), 540),
)  # fmt: skip


def owed_checks(tag: str | None = None) -> list[DeviceCheck]:
    """The owed GPU checks in run order (most important first), those of `tag` only when given."""
    checks = [check for check in OWED_GPU_CHECKS if tag in (None, "", "all", check.tag)]
    if not checks:
        raise UserError(f"no owed GPU check is tagged {tag!r}; tags: {', '.join(sorted({c.tag for c in OWED_GPU_CHECKS}))}")
    return checks


def main(argv: list[str]) -> int:
    """`python -m optimized_sd.benchmark.scenarios owed [TAG]`: one line per owed check for device_run.sh to run:
    its time cap, its name and its argv, shell-quoted."""
    import shlex

    if argv[:1] != ["owed"]:
        print("usage: python -m optimized_sd.benchmark.scenarios owed [flux|sd|all]")
        return 2
    for check in owed_checks(argv[1] if len(argv) > 1 else None):
        print(check.seconds, check.name, shlex.join(check.argv))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

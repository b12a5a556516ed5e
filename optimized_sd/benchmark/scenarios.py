"""Benchmark scenarios as data: what to run (ours in a memory mode, or a diffusers peer), at which size,
batch and step count, and the rules that turn the command's flags into a list of them.

Pure Python (no torch): the `bench` command imports it to check flags before any model work."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from optimized_sd.errors import UserError
from optimized_sd.memory.modes import MODES

KINDS = ("txt2img", "img2img")
OUR_MODES = MODES  # the memory mode table's names, fastest first
AUTO = "auto"  # the planner picks (by free memory, or by --budget)


@dataclass(frozen=True)
class Peer:
    """A diffusers configuration we measure against. `cuda_only`: an offload mode that needs a GPU;
    `needs_accelerate`: diffusers implements it through accelerate's hooks."""

    name: str
    description: str
    cuda_only: bool = False
    needs_accelerate: bool = False


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("diffusers", "StableDiffusionPipeline, everything on the device (the baseline)"),
        Peer("diffusers-model-offload", "enable_model_cpu_offload", cuda_only=True, needs_accelerate=True),
        Peer("diffusers-sequential-offload", "enable_sequential_cpu_offload", cuda_only=True, needs_accelerate=True),
        Peer("diffusers-attention-slicing", "enable_attention_slicing()"),
        Peer(
            "diffusers-group-offload",
            "enable_group_offload(block_level, 1 block per group, use_stream=True)",
            cuda_only=True,
        ),
    )
}
BASELINE_PEER = "diffusers"

# Which peers do the same job as each of our modes (each compared beside the baseline).
CLOSEST_PEERS: dict[str, tuple[str, ...]] = {
    "full": (),
    "turbo": ("diffusers-model-offload",),
    "split": ("diffusers-model-offload",),
    "stream": ("diffusers-group-offload", "diffusers-sequential-offload"),
}

QUICK = {"sizes": "256", "steps": 2, "modes": "full,stream", "peers": "diffusers", "kinds": "txt2img", "batches": "1"}
DEFAULT_STEPS = {"cuda": 10, "cpu": 2}


@dataclass(frozen=True)
class Scenario:
    """One measured run, in its own process. `mode` is one of our memory modes (or `auto`) or a
    peer's name; `budget` (e.g. "2GB") goes to the planner for `auto`."""

    kind: str
    height: int
    width: int
    batch: int
    steps: int
    mode: str
    budget: str | None = None

    @property
    def engine(self) -> str:
        return "diffusers" if self.mode in PEERS else "ours"

    @property
    def size(self) -> str:
        return str(self.width) if self.width == self.height else f"{self.width}x{self.height}"

    @property
    def group(self) -> str:
        """Scenarios that are compared with each other share a group: same work, different engine/mode."""
        return f"{self.kind}-{self.size}-b{self.batch}"

    @property
    def name(self) -> str:
        budget = f"-budget{self.budget}" if self.budget else ""
        return f"{self.group}-{self.mode}{budget}"

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name, "engine": self.engine, "group": self.group}

    @classmethod
    def from_dict(cls, data: dict) -> Scenario:
        return cls(**{k: data[k] for k in ("kind", "height", "width", "batch", "steps", "mode", "budget")})


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
    diffusers_available: bool = True,
    accelerate_available: bool = True,
) -> Selection:
    """The cross product kinds x sizes x batches x (our modes + peers), filtered by what the device and
    the installed packages can run, then by `only` (comma-separated name globs)."""
    kind_list = parse_names(kinds, KINDS, "kind", "--kinds")
    if not kind_list:
        raise UserError("--kinds is empty; give txt2img, img2img or both")
    size_list = parse_sizes(sizes)
    batch_list = parse_positive_ints(batches, "--batch")
    if steps < 1:
        raise UserError("--steps must be at least 1")
    mode_list = parse_names(modes, OUR_MODES + (AUTO,), "memory mode", "--modes")
    peer_list = parse_names(peers, tuple(PEERS), "peer", "--peers")
    budget_list = split_list(budget) if budget is not None else []
    if budget is not None:
        from optimized_sd.memory.planner import parse_bytes  # pure, no torch

        if not budget_list:
            raise UserError("--budget is empty; give sizes like 2GB or 1GB,2GB")
        for each in budget_list:
            parse_bytes(each)
    notes: list[str] = []
    if peer_list and not diffusers_available:
        notes.append("diffusers is not installed: ran ours alone (pip install diffusers accelerate to compare)")
        peer_list = []
    runnable_peers = []
    for name in peer_list:
        peer = PEERS[name]
        if peer.cuda_only and device_type != "cuda":
            notes.append(f"{name}: needs a CUDA device, skipped on {device_type}")
        elif peer.needs_accelerate and not accelerate_available:
            notes.append(f"{name}: diffusers needs accelerate for it, which is not installed; skipped")
        else:
            runnable_peers.append(name)
    scenarios = []
    for kind in kind_list:
        for height, width in size_list:
            for batch in batch_list:
                for mode in mode_list:
                    scenarios.append(Scenario(kind, height, width, batch, steps, mode))
                for each in budget_list:
                    scenarios.append(Scenario(kind, height, width, batch, steps, AUTO, each))
                for name in runnable_peers:
                    scenarios.append(Scenario(kind, height, width, batch, steps, name))
    scenarios = list(dict.fromkeys(scenarios))
    if only:
        patterns = split_list(only)
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s.name, p) for s in scenarios)]
        if unmatched:
            listed = ", ".join(s.name for s in scenarios[:12]) + (" ..." if len(scenarios) > 12 else "")
            raise UserError(f"--only: no scenario named {', '.join(repr(p) for p in unmatched)}; the flags give: {listed}")
        scenarios = [s for s in scenarios if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    if not scenarios:
        raise UserError("no scenario to run: give at least one of --modes or --peers")
    return Selection(scenarios, notes)

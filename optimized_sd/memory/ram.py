"""The host-RAM planner (`--ram-budget`): a pure function from the components' weight sizes, the mode the
device plan chose and a RAM budget to where each component's weights wait off the device.

Four homes, fastest first: a packed `pinned` copy of the whole component (async copies, today's default), a
bounded pinned `ring` that a reader thread fills from the memory-mapped file ahead of use (the streamed
denoiser on CUDA only), a `pageable` plain copy, and `mapped` (nothing kept: the file is read on use, its pages
file-backed and given back). Components used once per call (text towers, VAE halves, side networks) step down
first; the denoiser, read every step, last. Knows nothing of Stable Diffusion: components are names."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psutil

from optimized_sd.errors import FieldError, OutOfMemoryBudget, UserError
from optimized_sd.memory.modes import HostStorage
from optimized_sd.memory.planner import SAFETY_MARGIN, format_bytes, parse_bytes

HOME_ORDER = ("pinned", "ring", "pageable", "mapped")
"""Every home, fastest first (`HostPart.homes` lists a component's own, in this order)."""

ENGINE_HOST: Mapping[str, HostStorage] = {"pinned": "pinned", "ring": "ring", "pageable": "cpu", "mapped": "source"}
"""Each home as the offload engine's host storage."""

RING_MAX_BYTES = 2 * 2**30  # the ring's ceiling: enough to read several SDXL units ahead (ComfyUI's 2 GB pin floor)
RING_MIN_SLOTS = 2  # one slot copying to the device while the reader fills the next
# Pinned pages can be neither swapped nor reclaimed, and the ring and mapped reads live on the page cache: pins
# past this share of the budget step down to pageable copies.
PINNED_SHARE = 0.75
# What a CUDA process holds besides weights (the CUDA context, torch's and cuBLAS's libraries): measured
# 0.8-1.0 GiB of RSS after the first kernel on an H100 / H200 with torch 2.x; rounded up.
CUDA_PROCESS_OVERHEAD = 2**30


@dataclass(frozen=True)
class HostPart:
    """One component as the RAM planner sees it: its weight bytes as placed, its largest streamed unit (a
    ring's slot), and the homes it may take, fastest first (`HOME_ORDER`'s order)."""

    name: str
    bytes: int
    unit: int
    homes: tuple[str, ...]


@dataclass(frozen=True)
class HostPlan:
    """Where each component's weights wait, the ring's byte ceiling, and the host bytes the plan expects
    (`need`: everything counted against the budget; `pinned`: of which page-locked). Plain values only."""

    homes: dict[str, str] = field(default_factory=dict)
    ring_bytes: int = 0
    budget: int | None = None
    need: int = 0
    pinned: int = 0
    reason: str = ""

    def host_for(self, part: str, default: HostStorage) -> HostStorage:
        """The engine's host storage for component `part` (`default` where the plan says nothing of it)."""
        home = self.homes.get(part)
        return ENGINE_HOST[home] if home is not None else default


def parse_ram_budget(text: str | int | None) -> int | None:
    """`--ram-budget`: a size like 8GB (as --vram-budget), `auto` (the memory available now), or None (no limit:
    every component where its mode puts it)."""
    if text is None:
        return None
    if isinstance(text, str) and text.strip().lower() == "auto":
        return available_ram()
    try:
        return parse_bytes(str(text))  # NaN, a negative size, junk: the --vram-budget rules and words
    except UserError as error:
        raise FieldError.about("ram_budget", f"must be a size or auto: {error}") from None


def available_ram() -> int:
    """Host RAM available now (psutil: free plus reclaimable), the `auto` budget."""
    return int(psutil.virtual_memory().available)


def home_cost(home: str, part: HostPart, ring_bytes: int) -> tuple[int, int]:
    """(host bytes, of which pinned) that `part` holds in `home`."""
    if home == "pinned":
        return part.bytes, part.bytes
    if home == "ring":
        return ring_bytes, ring_bytes
    if home == "pageable":
        return part.bytes, 0
    return 0, 0


def ring_size(part: HostPart, room: int) -> int:
    """The ring's ceiling for `part`: whole slots of its largest unit within `room` and `RING_MAX_BYTES` (never
    above the part itself), or 0 when not even `RING_MIN_SLOTS` fit."""
    unit = max(part.unit, 1)
    slots = min(room, RING_MAX_BYTES, max(part.bytes, unit * RING_MIN_SLOTS)) // unit
    return slots * unit if slots >= RING_MIN_SLOTS else 0


def plan_host(parts: Sequence[HostPart], budget: int | None, *, base: int = 0, what: str = "") -> HostPlan:
    """Each part's home under `budget` host bytes, `base` of which the process needs whatever the homes (the CUDA
    context; on the CPU, the device plan's own estimate). Every part starts in its fastest home; while the plan
    passes the budget (or its pins `pin_cap`), the parts step down one home at a time, the
    denoiser last (`parts` come in that order: first steps down first). A budget nothing fits is refused in one
    line naming the smallest that fits (`what`: the device plan, for the message)."""
    homes = {part.name: part.homes[0] for part in parts if part.homes}
    if budget is None:
        return HostPlan(homes, ring_for(parts, homes, None), None, *totals(parts, homes, 0, base), reason="no RAM limit")

    def state() -> tuple[int, int, int]:
        ring = ring_for(parts, homes, ring_room(parts, homes, budget, base))
        need, pinned = totals(parts, homes, ring, base)
        return ring, need, pinned

    ring, need, pinned = state()
    for part in parts:
        rungs = list(part.homes)
        while (need > budget or pinned > pin_cap(budget, base)) and rungs.index(homes[part.name]) + 1 < len(rungs):
            homes[part.name] = rungs[rungs.index(homes[part.name]) + 1]
            if homes[part.name] == "ring" and ring_for(parts, homes, ring_room(parts, homes, budget, base)) == 0:
                continue  # too small for two slots: the next rung
            ring, need, pinned = state()
    if need > budget or pinned > pin_cap(budget, base):
        raise ram_refusal(budget, smallest_budget(parts, base), what)
    moved = [p.name for p in parts if p.homes and homes[p.name] != p.homes[0]]
    reason = "everything in its fastest home" if not moved else f"{', '.join(moved)} stepped down to fit {format_bytes(budget)}"
    return HostPlan(homes, ring, budget, need, pinned, reason)


def pin_cap(budget: int, base: int) -> float:
    """Pinned bytes a plan may hold: `PINNED_SHARE` of what the budget leaves beside the process' own `base`."""
    return PINNED_SHARE * (budget - base)


def ring_room(parts: Sequence[HostPart], homes: Mapping[str, str], budget: int, base: int) -> int:
    """The bytes a ring may take: what the budget leaves beside the other homes, and beside their pins."""
    need, pinned = totals(parts, homes, 0, base)
    return int(min(budget - need, pin_cap(budget, base) - pinned))


def ring_for(parts: Sequence[HostPart], homes: Mapping[str, str], room: int | None) -> int:
    """The ring's ceiling for the part that takes one (0: none does): as large as `room` allows (None: no limit)."""
    ringed = [p for p in parts if homes.get(p.name) == "ring"]
    if not ringed:
        return 0
    return ring_size(ringed[0], RING_MAX_BYTES if room is None else room)


def totals(parts: Sequence[HostPart], homes: Mapping[str, str], ring: int, base: int) -> tuple[int, int]:
    """(host bytes, pinned bytes) of the homes with a ring of `ring` bytes, `base` included in the first."""
    costs = [home_cost(homes[p.name], p, ring) for p in parts if p.name in homes]
    return base + sum(c[0] for c in costs), sum(c[1] for c in costs)


def ram_refusal(budget: int, smallest: int, what: str) -> OutOfMemoryBudget:
    """The one-line error for a RAM budget below `smallest`, the least any plan needs (`what`: the device plan)."""
    return OutOfMemoryBudget(
        f"a RAM budget of {format_bytes(budget)} is below the smallest plan{what}: it needs about {format_bytes(smallest)} "
        f"of host RAM with every weight memory-mapped; --ram-budget {format_bytes_up(smallest)} would fit"
    )


def smallest_budget(parts: Sequence[HostPart], base: int) -> int:
    """The least host RAM any plan needs: every part in its leanest home (memory-mapped where it may be)."""
    leanest = {p.name: p.homes[-1] for p in parts if p.homes}
    ring = ring_for(parts, leanest, 0)
    return totals(parts, leanest, ring, base)[0]


def format_bytes_up(value: int) -> str:
    """A size written so that reading it back is at least `value` (a budget to suggest)."""
    if value >= 2**30:
        return f"{math.ceil(value / 2**30 * 100) / 100:.2f}GB"
    return f"{math.ceil(value / 2**20)}MB"


def cpu_base(device_estimate: int) -> int:
    """On the CPU the device is the host: the device plan's estimate counts against the RAM budget, of which plans
    keep `SAFETY_MARGIN` (as the CPU's --vram-budget)."""
    return math.ceil(device_estimate / SAFETY_MARGIN)

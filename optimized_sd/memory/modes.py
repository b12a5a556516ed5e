"""The memory modes as data: one row per mode, the single source every part reads (the planner's
estimates and fallback ladder, the placement of groups, the session's engine options, the benchmark's
scenario names and report).

Pure Python (no torch), so the benchmark command can read it before any model work; and, like the rest
of `memory/`, it knows nothing of Stable Diffusion: "the denoiser in halves" or "in blocks" is said
abstractly here and mapped to module paths by `pipelines/placement.py`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Release = Literal["never", "after_forward", "stage_end"]
"""When an offload group leaves the device: `never` (resident for the whole run), `after_forward`
(streamed: dropped once its last module has run) or `stage_end` (kept until the current stage ends)."""

HostStorage = Literal["pinned", "ring", "cpu", "source"]
"""Where weights live while off the device: `pinned` a page-locked CPU copy (async copies), `ring` a bounded
pinned ring a reader thread fills from the (memory-mapped) file ahead of use (`memory/ring.py`, CUDA), `cpu` a
plain CPU copy, `source` nothing kept, the (memory-mapped) file re-read when needed (the RAM-lean CPU path)."""

Resident = Literal["everything", "stage"]
"""`everything`: one group of the whole model, placed once and never released; `stage`: each part is
brought in for the stage that runs it and released when that stage ends (or sooner, see `Grouping`)."""

Grouping = Literal["whole", "halves", "blocks"]
"""How the denoiser (the part the sampling loop calls many times) is cut into offload groups: one group,
two halves at the middle of its execution order, or every top-level block on its own."""

HOST_FOR_DEVICE: Mapping[str, HostStorage] = MappingProxyType({"cuda": "pinned", "cpu": "source", "mps": "cpu"})


@dataclass(frozen=True)
class MemoryMode:
    """One row of the table: everything that differs between modes."""

    name: str
    resident: Resident
    denoiser: Grouping
    host: Mapping[str, HostStorage]  # by device type
    prefetch: bool  # copy the next denoiser group ahead on a side stream (CUDA only)
    feed_forward_chunk_tokens: int | None  # run transformer feed-forwards over token slices of this size
    lean_heap_on_cpu: bool  # tune glibc per stage so freed tensors leave the resident set (CPU only)
    summary: str

    @property
    def denoiser_release(self) -> Release:
        """When a denoiser group is dropped: resident models keep it; halves and blocks are streamed
        through every call; a whole denoiser stays for its stage."""
        if self.resident == "everything":
            return "never"
        return "stage_end" if self.denoiser == "whole" else "after_forward"

    @property
    def streams_denoiser(self) -> bool:
        """Every denoiser weight is copied to the device once per denoiser call."""
        return self.denoiser_release == "after_forward"

    def host_for(self, device_type: str) -> HostStorage:
        return self.host.get(device_type, HOST_FOR_DEVICE.get(device_type, "cpu"))


FEED_FORWARD_CHUNK_TOKENS = 1024

MODE_TABLE: tuple[MemoryMode, ...] = (
    MemoryMode(
        "full",
        resident="everything",
        denoiser="whole",
        # On the CPU the resident model is a copy of its own: nothing re-reads the file, so no map is kept.
        host=MappingProxyType({**HOST_FOR_DEVICE, "cpu": "cpu"}),
        prefetch=False,
        feed_forward_chunk_tokens=None,
        lean_heap_on_cpu=False,
        summary="everything resident",
    ),
    MemoryMode(
        "turbo",
        resident="stage",
        denoiser="whole",
        host=HOST_FOR_DEVICE,
        prefetch=False,
        feed_forward_chunk_tokens=None,
        lean_heap_on_cpu=False,
        summary="the denoiser resident while sampling; text encoder and VAE brought in for their stage",
    ),
    MemoryMode(
        "split",
        resident="stage",
        denoiser="halves",
        host=HOST_FOR_DEVICE,
        prefetch=False,
        feed_forward_chunk_tokens=None,
        lean_heap_on_cpu=False,
        summary="stages swapped, the denoiser in two halves per call (optimizedSD's default)",
    ),
    MemoryMode(
        "stream",
        resident="stage",
        denoiser="blocks",
        host=HOST_FOR_DEVICE,
        prefetch=True,
        feed_forward_chunk_tokens=FEED_FORWARD_CHUNK_TOKENS,
        lean_heap_on_cpu=True,
        summary="denoiser blocks streamed one at a time with the next one prefetched",
    ),
)
"""Fastest first (and heaviest first): the planner's preference order and the out-of-memory ladder."""

MODES: tuple[str, ...] = tuple(row.name for row in MODE_TABLE)
MODE_ROWS: Mapping[str, MemoryMode] = MappingProxyType({row.name: row for row in MODE_TABLE})


def mode_row(name: str) -> MemoryMode:
    return MODE_ROWS[name]


def leaner(name: str) -> MemoryMode | None:
    """The next leaner mode, for the out-of-memory fallback."""
    index = MODES.index(name)
    return MODE_TABLE[index + 1] if index + 1 < len(MODE_TABLE) else None


def denoiser_stage_weights(row: MemoryMode, *, total: int, whole: int, largest_half: int, largest_block_pair: int) -> int:
    """Weight bytes on the device while the denoiser runs in this mode: the whole model when everything
    is resident, else the denoiser's resident share (all of it, its larger half, or the running block
    and the one being prefetched)."""
    if row.resident == "everything":
        return total
    return {"whole": whole, "halves": largest_half, "blocks": largest_block_pair}[row.denoiser]

"""A bounded pinned ring: a fixed number of page-locked slots that a reader thread fills from the (memory-mapped)
file ahead of use, one streamed unit per slot, in the order the units run. The engine takes a unit's slot, starts
its copy to the device without blocking, and hands the slot back with the copy's event; the reader reuses a slot
only once that event has completed. Host RAM stays at the ring's size however large the model (ComfyUI's
pinned ring, Feb 2026), instead of a pinned copy of the whole model.

Device work goes through a small seam (`Transfer`): on CUDA a slot is pinned and an event is a CUDA event; on the
CPU (and in tests) a slot is a plain tensor and a copy is complete at once, so the ring's logic runs anywhere."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

POLL_SECONDS = 0.0005  # how often the reader looks at pending copies' events when every slot is busy
TAKE_TIMEOUT_SECONDS = 600.0  # a unit not read in this long means a stuck disk or reader: an error, never a hang


class CopyEvent(Protocol):
    """A device copy's completion: `torch.cuda.Event` has this method."""

    def query(self) -> bool: ...


class Transfer(Protocol):
    """What the ring needs of the device: slots to fill, and a copy to the device that says when it is done."""

    def allocate(self, nbytes: int) -> Tensor: ...

    def to_device(self, host: Tensor, device: torch.device) -> tuple[Tensor, CopyEvent]: ...


class Done:
    """An event that is complete at once (a synchronous copy)."""

    def query(self) -> bool:
        return True


class CpuTransfer:
    """Plain slots and synchronous copies: the ring on a device without a link (the CPU), and its tests."""

    def allocate(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def to_device(self, host: Tensor, device: torch.device) -> tuple[Tensor, CopyEvent]:
        return host.to(device, copy=True), Done()


class CudaTransfer:
    """Page-locked slots; the copy runs on the current stream without blocking the host, its event recorded there."""

    def allocate(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def to_device(self, host: Tensor, device: torch.device) -> tuple[Tensor, CopyEvent]:
        copy = host.to(device, non_blocking=True, copy=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return copy, event


def transfer_for(device: torch.device) -> Transfer:
    return CudaTransfer() if device.type == "cuda" else CpuTransfer()


SlotState = Literal["free", "filling", "ready", "taken", "copying"]


@dataclass
class RingSlot:
    """One slot: its buffer (made at its first fill), what it holds and, while its copy runs, that copy's event."""

    index: int
    state: SlotState = "free"
    unit: str | None = None
    buffer: Tensor | None = None
    event: CopyEvent | None = None


class RingClosed(RuntimeError):
    """The ring was closed (or its reader failed) while a unit was wanted."""


class PinnedRing:
    """`slots` slots of `slot_bytes` each, filled by `fill(unit, buffer)` on a reader thread in `order` (cyclic:
    the denoiser's units come round every step). `take(unit)` returns a filled slot; a unit asked for out of order
    (a stage cut short, another model's call between) starts the reading over at that unit. `give_back(slot,
    event)` returns a slot once `event` completes. `close()` stops the reader; an error in `fill` is raised by
    the next `take`."""

    def __init__(
        self,
        order: Sequence[str],
        fill: Callable[[str, Tensor], None],
        *,
        slot_bytes: int,
        slots: int,
        transfer: Transfer,
        take_timeout: float = TAKE_TIMEOUT_SECONDS,
    ) -> None:
        if not order or slots < 1:
            raise ValueError("a ring needs units to read and at least one slot")
        self.order = list(order)
        self.position = {unit: index for index, unit in enumerate(self.order)}
        self.fill = fill
        self.slot_bytes = slot_bytes
        self.transfer = transfer
        self.take_timeout = take_timeout
        self.slots = [RingSlot(index) for index in range(min(slots, len(self.order)))]
        self.ready: list[RingSlot] = []  # filled, in the order they will be taken
        self.cursor = 0  # the next unit to read
        self.filling: str | None = None
        self.allocated_bytes = 0  # slot memory made so far (never above `capacity`)
        self.error: BaseException | None = None
        self.failed: str | None = None  # the unit whose reading raised `error`
        self.closed = False
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="pinned-ring-reader", daemon=True)
        self._thread.start()

    @property
    def capacity(self) -> int:
        return self.slot_bytes * len(self.slots)

    # -- the reader ---------------------------------------------------------------------------
    def _free_slot(self) -> RingSlot | None:
        """A slot the reader may fill: free, or its copy's event complete (then free)."""
        for slot in self.slots:
            if slot.state == "copying" and slot.event is not None and slot.event.query():
                slot.state, slot.event, slot.unit = "free", None, None
            if slot.state == "free":
                return slot
        return None

    def _read(self) -> None:
        while True:
            with self._lock:
                slot = self._free_slot()
                while not self.closed and slot is None:
                    waiting_on_copies = any(s.state == "copying" for s in self.slots)
                    self._lock.wait(POLL_SECONDS if waiting_on_copies else None)
                    slot = self._free_slot()
                if self.closed:
                    return
                assert slot is not None
                unit = self.order[self.cursor]
                self.cursor = (self.cursor + 1) % len(self.order)
                slot.state, slot.unit, self.filling = "filling", unit, unit
                if slot.buffer is None:
                    slot.buffer = self.transfer.allocate(self.slot_bytes)
                    self.allocated_bytes += self.slot_bytes
            try:
                self.fill(unit, slot.buffer)
            except BaseException as error:  # noqa: BLE001 - handed to the taker, which raises it
                with self._lock:
                    self.error, self.failed, self.filling = error, unit, None
                    slot.state = "free"
                    self._lock.notify_all()
                return
            with self._lock:
                self.filling = None
                if slot.unit == unit and slot.state == "filling":
                    slot.state = "ready"
                    self.ready.append(slot)
                else:  # dropped while being filled (the reading started over)
                    slot.state, slot.unit = "free", None
                self._lock.notify_all()

    # -- the engine's side ----------------------------------------------------------------------
    def take(self, unit: str) -> RingSlot:
        """The slot holding `unit`'s bytes, waiting for the reader as needed (never longer than `take_timeout`)."""
        deadline = time.monotonic() + self.take_timeout
        with self._lock:
            while True:
                if self.closed:
                    raise RingClosed(f"the ring was closed while {unit} was wanted")
                found = next((i for i, slot in enumerate(self.ready) if slot.unit == unit), None)
                if found is None and self.error is not None:  # units read before the error are still served
                    raise RingClosed(f"reading {self.failed} ahead failed: {self.error}") from self.error
                if found is not None:
                    for skipped in self.ready[:found]:  # read for calls that did not come
                        skipped.state, skipped.unit = "free", None
                    slot = self.ready[found]
                    self.ready = self.ready[found + 1 :]
                    slot.state = "taken"
                    self._lock.notify_all()
                    return slot
                for skipped in self.ready:
                    skipped.state, skipped.unit = "free", None
                self.ready = []
                if self.filling != unit and self.order[self.cursor] != unit:
                    self.cursor = self.position[unit]  # out of order: read from `unit` on
                    for slot in self.slots:
                        if slot.state == "filling":
                            slot.unit = None  # its bytes are for a unit no longer wanted next
                self._lock.notify_all()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RingClosed(f"{unit} was not read within {self.take_timeout:.0f} s")
                self._lock.wait(remaining)

    def give_back(self, slot: RingSlot, event: CopyEvent) -> None:
        """The slot's bytes are being copied; the reader may refill it once `event` completes."""
        with self._lock:
            slot.state, slot.event = "copying", event
            self._lock.notify_all()

    def pinned_bytes(self) -> int:
        return self.allocated_bytes

    def close(self, timeout: float = 10.0) -> None:
        """Stop the reader (it finishes the unit it is reading) and let go of the slots. The caller has waited for
        the copies still running (the engine synchronizes its copy stream first)."""
        with self._lock:
            self.closed = True
            self._lock.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for slot in self.slots:
            slot.buffer, slot.event = None, None
        self.ready = []

    @property
    def reader_alive(self) -> bool:
        return self._thread.is_alive()

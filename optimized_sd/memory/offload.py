"""Offload engine: groups of modules whose weights are brought to the compute device by hooks just
before they run and sent back when the plan says, with the next group prefetched on a side CUDA stream.

Knows `nn.Module` and tensor sources, nothing of Stable Diffusion: which modules form a group, when a
group is released and which group follows which all come from the caller's `GroupSpec`s."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from optimized_sd.memory.modes import HostStorage, Release
from optimized_sd.memory.ram import RING_MAX_BYTES
from optimized_sd.memory.ring import PinnedRing, Transfer, transfer_for
from optimized_sd.tensor_swap import swap_tensor

TensorHook = Callable[[str, Tensor], None]


@dataclass(frozen=True)
class GroupSpec:
    """Modules (dotted paths under the root) that move together. `release`: `never` (resident for
    the whole run), `after_forward` (streamed: dropped once its last module has run) or `stage_end`
    (kept until the current stage ends). `rows`: the group is one embedding table (`nn.Embedding`)
    and each call brings only the rows it looks up to the device, never the whole table (a text tower's
    77 tokens out of 49,408: SDXL's bigG table is 126 MB in fp16). `on_demand`: modules inside a
    streamed group that may not run at every call (a cross-attention's key and value projections, whose
    outputs the sampling stage keeps): read only when called, into memory of their own, never into the
    arena their enclosing group holds."""

    name: str
    modules: tuple[str, ...]
    release: Release = "stage_end"
    prefetch_next: str | None = None
    rows: bool = False
    on_demand: bool = False
    host: HostStorage | None = None  # where this group waits off the device (None: the engine's `host`)


@dataclass
class TensorSlot:
    """Where one parameter or buffer lives: its owner module and name, and its host copy."""

    key: str
    owner: nn.Module
    leaf: str
    is_parameter: bool
    shape: torch.Size
    packed: bool  # floating, or kept in its stored dtype: packed with its group's buffer
    placed_dtype: torch.dtype  # on the device and in the host copy
    kept: bool = False  # in the source's dtype (`OffloadEngine.keep_dtype`), not the compute dtype
    channels_last: bool = False  # a 4-D weight laid out (out, kh, kw, in) in memory (`OffloadEngine.channels_last`)
    host: Tensor | None = None
    vacant: Tensor | None = None  # the placeholder it holds while away, made once (`OffloadEngine._vacant`)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.placed_dtype.itemsize

    @functools.cached_property
    def table(self) -> dict[str, Tensor]:
        """The owner's dict this slot's tensor sits in (its parameters or its buffers): a streamed block's
        tensors are swapped twice per step, so the hot paths assign here directly."""
        return self.owner._parameters if self.is_parameter else self.owner._buffers  # type: ignore[return-value]

    @property
    def patchable(self) -> bool:
        """Placed in the compute dtype, so `tensor_hook` may patch it (not a tensor kept in its stored dtype)."""
        return self.packed and not self.kept


ALIGN_BYTES = 128  # each tensor of a packed group starts on a 128-byte boundary, whatever its dtype
RELEASE_BATCH_BYTES = 16 << 20  # `stream` on the CPU hands file pages back after this many bytes copied (and at a group's end)


@dataclass
class ArenaPlace:
    """Where one slot of a streamed group lands in the shared arena: its view there, and what the slot
    holds while the group is in (that view, as a Parameter where the slot is one; None: a fresh one each
    time, for tensors kept in their stored dtype, whose op layer caches work keyed by the weight object).
    `source`: the tensor read from the source, kept when it views the file's mapping (memory torch did
    not allocate, so holding the view holds no RAM: its pages are handed back all the same); a tensor the
    source computed (fused, transposed, quantised) is read again at each load, as before."""

    slot: TensorSlot
    view: Tensor
    held: Tensor | None
    source: Tensor | None = None


class SharedArena:
    """The one reused buffer that streamed groups land in on the CPU lean path (`OffloadEngine._uses_arena`),
    shareable by several engines whose streamed groups never run at the same time: a ControlNet's blocks all
    run before its UNet's at every model call, so with an arena each it held its largest block beside the
    UNet's (SD 1.5: 376 MiB more RSS while sampling), with one the larger of the two. Each engine reserves
    its largest group's bytes; the buffer is made at first use at the largest reservation and dropped at
    stage end. `generation` changes with each buffer made, so an engine re-makes its views into a new one."""

    def __init__(self) -> None:
        self.length = 0
        self.generation = 0
        self.occupant: Group | None = None  # the streamed group whose tensors the buffer holds
        self.current: Tensor | None = None  # the buffer, while made

    def reserve(self, length: int) -> None:
        self.length = max(self.length, length)

    def buffer(self, device: torch.device) -> Tensor:
        if self.current is None or self.current.numel() < self.length:
            self.current = torch.empty(self.length, dtype=torch.uint8, device=device)
            self.generation += 1
        return self.current

    def enter(self, group: Group) -> None:
        """`group` fills the buffer: refused while another group placed in it is still resident (its weights
        would be overwritten under it)."""
        if self.occupant is not None and self.occupant is not group and self.occupant.resident:
            raise RuntimeError(f"streamed group {group.spec.name} would overwrite {self.occupant.spec.name} in the shared arena")
        self.occupant = group

    def drop(self) -> None:
        self.current, self.occupant = None, None


class Group:
    """Runtime state of one group: resident or not, and the event that says its copy finished.

    With host copies, a group's tensors are packed into one flat page-locked byte buffer
    (`packed_host`; each slot's host tensor is a typed view of it), so bringing the group in is one
    host-to-device copy instead of one per tensor: on a fast GPU the per-tensor launches, not the
    bytes, were what kept streaming from hiding behind compute. Bytes, not elements, because a group
    may mix dtypes: 8-bit weights beside their scales and 16-bit norms (`keep_dtype`)."""

    def __init__(self, spec: GroupSpec, slots: list[TensorSlot]) -> None:
        self.spec = spec
        self.slots = slots
        self.resident = False
        self.ready: torch.cuda.Event | None = None
        self.bytes = sum(slot.nbytes for slot in slots)  # as placed on the device
        self.packed_host: Tensor | None = None
        self.packed_device: Tensor | None = None
        self.offsets: dict[str, int] = {}
        self.packed_length = 0  # bytes of the packed buffer (`pack_layout`)

    def pack_layout(self) -> int:
        """Give each packed slot (floating tensors, and those kept in their stored dtype) an aligned
        byte offset in the packed buffer; returns its length in bytes."""
        length = 0
        for slot in self.slots:
            if slot.packed:
                self.offsets[slot.key] = length
                length += -(-slot.nbytes // ALIGN_BYTES) * ALIGN_BYTES
        self.packed_length = length
        return length

    def view(self, packed: Tensor, slot: TensorSlot) -> Tensor:
        """Slot `slot`'s tensor inside a packed byte buffer (host or device), channels-last where flagged:
        a copy into the view then writes that layout as it casts, at no extra pass."""
        start = self.offsets[slot.key]
        flat = packed[start : start + slot.nbytes].view(slot.placed_dtype)
        if slot.channels_last:
            out, channels, height, width = slot.shape
            return flat.view(out, height, width, channels).permute(0, 3, 1, 2)
        return flat.view(slot.shape)


class OffloadEngine:
    """Places the weights of `root` as `specs` say, from `source` (a name -> tensor lookup).

    host storage: `pinned` keeps a page-locked CPU copy in the compute dtype (CUDA, allows async
    prefetch), `cpu` a plain CPU copy, `source` re-reads the (memory-mapped) file each time the group
    is needed and keeps nothing, the RAM-lean path for machines without a GPU.

    Floating tensors are placed in the compute dtype, except the keys in `keep_dtype`, which keep the
    source's dtype everywhere (host copy, packed buffers, device): 8-bit weights and their scales, which
    the model's op layer dequantises at compute. The engine only moves their bytes.

    `tensor_hook(key, tensor)` is called with each floating tensor's checkpoint key and its device
    copy, in the compute dtype, right after the copy is placed (every load of every group, resident
    groups included), so a patch (a LoRA merged in place) changes exactly the copy that computes and
    never the host copy or the file (tensors kept in their stored dtype are not passed to it).
    `reload()` places the resident groups again, so a changed hook takes effect at once (removing it
    restores the original values). `copied_bytes` counts the weight bytes brought to the device.

    `channels_last`: module paths whose 4-D weights (convolutions) are placed in the channels-last
    layout, host copies and shared buffers included, for a model that runs its activations that way
    (oneDNN's native layout on the CPU)."""

    def __init__(
        self,
        root: nn.Module,
        source,  # optimized_sd.weights.sources.TensorSource
        specs: Sequence[GroupSpec],
        device: torch.device,
        dtype: torch.dtype,
        *,
        host: HostStorage,
        prefetch: bool = False,
        tensor_hook: TensorHook | None = None,
        keep_dtype: Collection[str] = (),
        channels_last: Collection[str] = (),
        ring_bytes: int = RING_MAX_BYTES,
        transfer: Transfer | None = None,
        arena: SharedArena | None = None,
    ) -> None:
        self.root = root
        self.tensor_hook = tensor_hook
        self.source = source
        self.device = device
        self.dtype = dtype
        self.keep_dtype = frozenset(keep_dtype)
        self.channels_last = tuple(f"{path}." for path in channels_last)
        self.host = host
        self.copied_bytes = 0  # weight bytes brought to the device since construction (host/file -> device)
        self.prefetch_enabled = prefetch and device.type == "cuda"
        # Weight bytes of streamed groups that may be on the device at once when copying ahead; the
        # group after the running one is always fetched, further ones only within this.
        self.lookahead_bytes = 0
        self.copy_stream = torch.cuda.Stream(device) if self.prefetch_enabled else None
        self.events: list[tuple[str, str, tuple[str, ...]]] = []  # (action, group, resident after)
        self.groups: dict[str, Group] = {}
        self.demanded: dict[str, Group] = {}  # `on_demand` groups: placed while their modules run, not in `groups`
        self._stage_loaded: list[Group] = []
        # The home of streamed groups on the CPU lean path: this engine's own, or one it shares (`SharedArena`).
        self.arena = SharedArena() if arena is None else arena
        self._owns_arena = arena is None
        # The `on_demand` groups' own reused buffer: they run inside a group that holds the arena, and like the
        # streamed groups they should make no fresh memory at each read.
        self.demand_arena = SharedArena()
        self._arena_places: dict[str, tuple[SharedArena, int, list[ArenaPlace]]] = {}  # by group: its arena, buffer, places
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        available = set(source.keys())
        # A module nested in another group's module belongs to the innermost group that names it, so a
        # group may hold a module's own tensors (e.g. a text tower's position embedding) while its
        # children stream in groups of their own.
        paths = {path for spec in specs for path in spec.modules}
        for spec in specs:
            slots = [
                self._slot(path, local, tensor)
                for path in spec.modules
                for local, tensor in root.get_submodule(path).state_dict(keep_vars=True).items()
                if f"{path}.{local}" in available and not self._claimed_deeper(path, local, paths)
            ]
            (self.demanded if spec.on_demand else self.groups)[spec.name] = Group(spec, slots)
        arena_groups = [group for group in self.groups.values() if self._uses_arena(group)]
        self.arena.reserve(max((group.pack_layout() for group in arena_groups), default=0))
        demanded = [group for group in self.demanded.values() if self._uses_arena(group)]
        self.demand_arena.reserve(max((group.pack_layout() for group in demanded), default=0))
        self.transfer = transfer if transfer is not None else transfer_for(device)
        self.ring = self._make_ring(ring_bytes)
        for group in [*self.groups.values(), *self.demanded.values()]:
            self._prepare_host(group)
            self._install_hooks(group)
        for group in self.groups.values():
            if group.spec.release == "never":
                self.load(group.spec.name)

    # -- construction -------------------------------------------------------------------------
    def host_of(self, group: Group) -> HostStorage:
        """Where `group` waits off the device: its spec's own storage (the RAM plan's), else the engine's. An
        `on_demand` group is never read ahead, so never through the ring: from the file."""
        host = group.spec.host or self.host
        return "source" if host == "ring" and group.spec.on_demand else host

    def _make_ring(self, ring_bytes: int) -> PinnedRing | None:
        """The pinned ring of the `ring` groups (in the order they run), slots sized to the largest of them, as many
        as `ring_bytes` holds (at least two: one copying while the next is read); None when no group uses one."""
        ringed = [group for group in self.groups.values() if self.host_of(group) == "ring" and not group.spec.rows]
        if not ringed:
            return None
        slot_bytes = max(group.pack_layout() for group in ringed)
        by_name = {group.spec.name: group for group in ringed}
        return PinnedRing(
            list(by_name), lambda name, buffer: self._fill_slot(by_name[name], buffer),
            slot_bytes=slot_bytes, slots=max(2, ring_bytes // max(slot_bytes, 1)), transfer=self.transfer,
        )  # fmt: skip

    def _fill_slot(self, group: Group, buffer: Tensor) -> None:
        """The reader thread's work: the group's packed tensors cast from the file into a ring slot, each one's file
        pages handed back once copied."""
        for slot in group.slots:
            if slot.key in group.offsets:
                group.view(buffer, slot).copy_(self.source.get(slot.key).reshape(slot.shape))
                self.source.release([slot.key])

    @staticmethod
    def _claimed_deeper(path: str, local: str, paths: set[str]) -> bool:
        """Whether the tensor `path.local` sits under another group's module nested inside `path`."""
        parts = local.split(".")[:-1]
        return any(f"{path}.{'.'.join(parts[:i])}" in paths for i in range(1, len(parts) + 1))

    def _slot(self, path: str, local: str, tensor: Tensor) -> TensorSlot:
        key = f"{path}.{local}"
        *owner_path, leaf = key.split(".")
        owner = self.root.get_submodule(".".join(owner_path))
        stored = self.source.dtype(key)
        kept = key in self.keep_dtype
        return TensorSlot(
            key=key,
            owner=owner,
            leaf=leaf,
            is_parameter=leaf in owner._parameters,
            shape=tensor.shape,
            packed=stored.is_floating_point or kept,
            placed_dtype=self._placed_dtype(stored, kept),
            kept=kept,
            channels_last=tensor.dim() == 4 and key.startswith(self.channels_last),
        )

    def _placed_dtype(self, stored: torch.dtype, kept: bool) -> torch.dtype:
        """The compute dtype for floating tensors; the file's own for the rest (e.g. position ids) and
        for the keys kept in their stored dtype."""
        return self.dtype if stored.is_floating_point and not kept else stored

    def _vacant(self, slot: TensorSlot) -> Tensor:
        """What a slot holds while its group is away: shape and dtype, no memory. Made once per slot: a
        streamed group is dropped every step."""
        if slot.vacant is None:
            slot.vacant = self._held(slot, torch.empty(slot.shape, dtype=slot.placed_dtype, device="meta"))
        return slot.vacant

    @staticmethod
    def _held(slot: TensorSlot, value: Tensor) -> Tensor:
        """`value` as the slot keeps it: a Parameter (no autograd) for a parameter, else the tensor itself."""
        return nn.Parameter(value, requires_grad=False) if slot.is_parameter else value

    def _prepare_host(self, group: Group) -> None:
        """Make the host copies (not for `never` groups, which go straight to the device, nor for the
        `source` strategy), and leave every slot holding a placeholder that costs no memory."""
        host = self.host_of(group)
        keep_copy = host in ("pinned", "cpu") and group.spec.release != "never"
        pin = host == "pinned" and self.device.type == "cuda"
        if keep_copy:
            group.packed_host = torch.empty(group.pack_layout(), dtype=torch.uint8, pin_memory=pin)
        for slot in group.slots:
            if not keep_copy:
                self._set(slot, self._vacant(slot))
                continue
            value = self.source.get(slot.key).reshape(slot.shape)
            if slot.key in group.offsets:
                slot.host = group.view(group.packed_host, slot)
                slot.host.copy_(value)
            else:  # integer tensors, rare: kept on their own
                host = value.clone()
                slot.host = host.pin_memory() if pin else host
            self.source.release([slot.key])  # copied: its file pages go now, not after the whole pack
            self._set(slot, slot.host)

    def _install_hooks(self, group: Group) -> None:
        if group.spec.rows:
            table = self.root.get_submodule(group.spec.modules[0])
            self._hooks.append(table.register_forward_pre_hook(lambda module, args: self._gather_rows(group, args)))
            self._hooks.append(table.register_forward_hook(lambda module, args, output: self._drop(group)))
            return
        first = self.root.get_submodule(group.spec.modules[0])
        last = self.root.get_submodule(group.spec.modules[-1])
        name = group.spec.name
        if group.spec.on_demand:
            self._hooks.append(first.register_forward_pre_hook(lambda module, args: self._demand(group)))
            self._hooks.append(last.register_forward_hook(lambda module, args, output: self._drop(group)))
            return
        self._hooks.append(first.register_forward_pre_hook(lambda module, args: self._before(name)))
        self._hooks.append(last.register_forward_hook(lambda module, args, output: self._after(name)))

    # -- movement -----------------------------------------------------------------------------
    def _set(self, slot: TensorSlot, value: Tensor) -> None:
        swap_tensor(slot.owner, slot.leaf, value)

    def _placed(self, slot: TensorSlot, value: Tensor, held: Tensor | None = None) -> None:
        """Swap in a device copy just made (or `held`, the form of it the slot keeps, made earlier), and let
        the hook patch it (floating tensors in the compute dtype only)."""
        self._set(slot, value if held is None else held)
        if self.tensor_hook is not None and slot.patchable:
            self.tensor_hook(slot.key, value)

    def _copy_in(self, group: Group) -> None:
        """Device copies of the group's tensors, from the host copy or the file."""
        non_blocking = self.host_of(group) == "pinned"
        in_arena = group.packed_host is None and self._uses_arena(group)
        if group.packed_host is not None:
            group.packed_device = group.packed_host.to(self.device, non_blocking=non_blocking, copy=True)
        elif self.ring is not None and self.host_of(group) == "ring":
            slot = self.ring.take(group.spec.name)
            assert slot.buffer is not None
            group.packed_device, done = self.transfer.to_device(slot.buffer[: group.packed_length], self.device)
            self.ring.give_back(slot, done)
        elif in_arena:
            group.packed_device = self._arena_of(group).buffer(self.device)
            self._fill_arena(group)
        # Every tensor placed below is a copy, so the file pages it was read from are handed back as soon as
        # it is made: a group read whole (`turbo`'s denoiser, `split`'s halves) never holds its file pages
        # beside its copies (SD 1.5's UNet on the CPU: 1.7 GB of fp16 pages beside 3.4 GB of fp32).
        for slot in group.slots:
            if slot.key in group.offsets and group.packed_device is not None:
                if not in_arena:
                    self._placed(slot, group.view(group.packed_device, slot))
                continue
            value = slot.host if slot.host is not None else self.source.get(slot.key)
            value = value.reshape(slot.shape).to(device=self.device, dtype=slot.placed_dtype, non_blocking=non_blocking, copy=True)
            if slot.host is None:
                self.source.release([slot.key])
            if slot.channels_last:
                value = value.contiguous(memory_format=torch.channels_last)
            self._placed(slot, value)
        self.copied_bytes += group.bytes

    def _uses_arena(self, group: Group) -> bool:
        """Streamed groups read from the file without prefetch (the CPU lean path) all land in one
        reused buffer: fresh memory for every block of every step costs a page fault per 4 KiB,
        which on a CPU was a third of the step time."""
        streamed = group.spec.release == "after_forward" and not group.spec.rows
        return self.host_of(group) == "source" and streamed and not self.prefetch_enabled

    def _gather_rows(self, group: Group, args: tuple) -> tuple:
        """Before an embedding table of a `rows` group runs: put the rows its ids look up on the device,
        as the table (read from the host copy or the file), and renumber the ids into it. The LoRA hook
        is not applied to these rows: no LoRA patches a token embedding."""
        ids, *rest = args
        slot = group.slots[0]
        used, positions = torch.unique(ids, return_inverse=True)
        home = slot.host if slot.host is not None else self.source.get(slot.key).reshape(slot.shape)
        rows = home.index_select(0, used.to(home.device)).to(device=self.device, dtype=slot.placed_dtype)
        self._set(slot, rows)
        self.source.release([slot.key])
        self.copied_bytes += rows.numel() * rows.element_size()
        self.events.append(("rows", group.spec.name, self.resident_names()))
        if self.prefetch_enabled:
            self._prefetch_after(group.spec.name)
        return (positions, *rest)

    def _fill_arena(self, group: Group) -> None:
        """Cast the group's packed tensors from the file straight into their places in the shared arena,
        their file pages handed back once copied, a batch of at most `RELEASE_BATCH_BYTES` at a time (one call
        per batch, adjacent tensors one span: per tensor it was a third of `stream`'s own cost per step on the
        tiny SDXL). Runs for every block of every step, so nothing is made per tensor here that can be made once
        per arena."""
        places = self._places_in_arena(group)
        self._arena_of(group).enter(group)
        copied: list[str] = []
        copied_bytes = 0
        for place in places:
            slot = place.slot
            value = place.source
            if value is None:
                value = self.source.get(slot.key).reshape(slot.shape)
                if not value.untyped_storage().resizable():  # a view of the mapping, not memory of torch's
                    place.source = value
            place.view.copy_(value)
            copied.append(slot.key)
            copied_bytes += value.nbytes
            if copied_bytes >= RELEASE_BATCH_BYTES:
                self.source.release(copied)
                copied, copied_bytes = [], 0
            if place.held is not None and self.tensor_hook is None:
                slot.table[slot.leaf] = place.held  # what `_placed` does, without three calls per tensor per step
            else:
                self._placed(slot, place.view, place.held)
        if copied:
            self.source.release(copied)

    def _places_in_arena(self, group: Group) -> list[ArenaPlace]:
        """The group's packed slots' places in the current arena, made at the group's first load into it:
        re-making each view and Parameter at every load was most of `stream`'s own cost per step on the CPU."""
        arena = self._arena_of(group)
        buffer = arena.buffer(self.device)
        made = self._arena_places.get(group.spec.name)
        if made is not None and made[0] is arena and made[1] == arena.generation:
            return made[2]
        # none yet, or views of a buffer since dropped or outgrown: every view of that one goes, not to hold it
        stale = [name for name, (owner, generation, _) in self._arena_places.items() if owner is arena and generation != arena.generation]
        for name in stale:
            del self._arena_places[name]
        places = []
        for slot in group.slots:
            if slot.key in group.offsets:
                view = group.view(buffer, slot)
                places.append(ArenaPlace(slot, view, None if slot.kept else self._held(slot, view)))
        self._arena_places[group.spec.name] = (arena, arena.generation, places)
        return places

    def _arena_of(self, group: Group) -> SharedArena:
        """The buffer a group lands in on the CPU lean path (made at first use, dropped at stage end): the one
        streamed groups share, or the one of the `on_demand` groups, which run inside them."""
        return self.demand_arena if group.spec.on_demand else self.arena

    def load(self, name: str, *, asynchronous: bool = False) -> None:
        """Make a group resident; with `asynchronous`, on the copy stream (waited for before use)."""
        group = self.groups[name]
        if group.resident or group.spec.rows:  # a table read by rows is never placed whole
            return
        if asynchronous and self.copy_stream is not None:
            # No wait on the compute stream: the copy only reads pinned host memory, and device memory
            # freed by earlier groups is reused only after the compute stream passed it (record_stream).
            with torch.cuda.stream(self.copy_stream):
                self._copy_in(group)
                group.ready = torch.cuda.Event()
                group.ready.record(self.copy_stream)
            action = "prefetch"
        else:
            self._copy_in(group)
            action = "load"
        group.resident = True
        if group.spec.release == "stage_end":
            self._stage_loaded.append(group)
        self.events.append((action, name, self.resident_names()))

    def release(self, name: str) -> None:
        """Drop a group's device copies; the host copy (or the file) remains the home."""
        group = self.groups[name]
        if not group.resident or group.spec.release == "never":
            return
        self._drop(group)
        self.events.append(("release", name, self.resident_names()))

    def _before(self, name: str) -> None:
        group = self.groups[name]
        if not group.resident:
            self.load(name)
        if group.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(group.ready)
            for slot in group.slots:  # memory made on the copy stream is now also used here
                if slot.key not in group.offsets or group.packed_device is None:
                    tensor = slot.owner._parameters.get(slot.leaf) if slot.is_parameter else slot.owner._buffers[slot.leaf]
                    tensor.record_stream(current)
            if group.packed_device is not None:
                group.packed_device.record_stream(current)
            group.ready = None
        self.events.append(("run", name, self.resident_names()))
        if self.prefetch_enabled:
            self._prefetch_after(name)

    def _demand(self, group: Group) -> None:
        """Place an `on_demand` group for the call of its modules about to run (dropped when they end)."""
        self._copy_in(group)
        group.resident = True
        self.events.append(("demand", group.spec.name, self.resident_names()))

    def _prefetch_after(self, name: str) -> None:
        """Start the copies of the groups that follow `name`: the next one always, further ones while
        the streamed groups on the device, these included, stay within `lookahead_bytes`."""
        held = sum(g.bytes for g in self.groups.values() if g.resident and g.spec.release == "after_forward")
        following, ahead = self.groups[name].spec.prefetch_next, 0
        while following is not None and following != name:
            group = self.groups[following]
            if not group.resident and not group.spec.rows:
                if ahead and held + group.bytes > self.lookahead_bytes:
                    return
                self.load(following, asynchronous=True)
                held += group.bytes
            following, ahead = group.spec.prefetch_next, ahead + 1

    def _after(self, name: str) -> None:
        if self.groups[name].spec.release == "after_forward":
            self.release(name)

    @contextlib.contextmanager
    def stage(self) -> Iterator[None]:
        """Groups loaded with release `stage_end` during the block are released when it ends."""
        self._stage_loaded = []
        try:
            yield
        finally:
            for group in self._stage_loaded:
                self.release(group.spec.name)
            self._stage_loaded = []
            # A streamed group prefetched for a call that will not come is dropped too.
            for group in self.groups.values():
                if group.spec.release == "after_forward" and group.resident:
                    self.release(group.spec.name)
            self.arena.drop()
            self.demand_arena.drop()
            self._arena_places.clear()

    def resident_names(self) -> tuple[str, ...]:
        return tuple(name for name, group in self.groups.items() if group.resident)

    def resident_bytes(self) -> int:
        """Bytes of weights currently on the device, as placed (compute dtype, or the stored dtype of kept keys)."""
        return sum(group.bytes for group in self.groups.values() if group.resident)

    def reload(self) -> None:
        """Place every resident group again from its home (host copy or file), through the current
        `tensor_hook`: how a changed hook reaches groups that are not loaded again by themselves."""
        for group in self.groups.values():
            if group.resident:
                self._drop(group)
                self.load(group.spec.name)

    def _drop(self, group: Group) -> None:
        """Forget a group's device copies, whatever its release rule (slots back to host copies or placeholders)."""
        for slot in group.slots:
            if slot.host is None:  # the placeholder, already in the form the slot keeps (`_vacant`)
                slot.table[slot.leaf] = slot.vacant if slot.vacant is not None else self._vacant(slot)
            else:
                self._set(slot, slot.host)
        group.resident = False
        group.ready = None
        group.packed_device = None

    def close(self) -> None:
        """Let go of everything: hooks, device copies (the model is left holding placeholders), the
        pinned packed buffers and host copies, the shared arena and the copy stream. A long-lived
        process calls it (through `StableDiffusion.close`) to hand pinned memory and file pages back."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy may still write into a buffer dropped below
        if self.device.type == "cuda" and self.ring is not None:
            torch.cuda.synchronize(self.device)  # nor read from a ring slot (a copy on the compute stream)
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        for group in [*self.groups.values(), *self.demanded.values()]:
            for slot in group.slots:
                slot.host = None
            self._drop(group)
            group.packed_host = None
        self._stage_loaded = []
        if self._owns_arena:  # a shared one is still in use by the others (a ControlNet released mid-stage)
            self.arena.drop()
        self.demand_arena.drop()
        self._arena_places.clear()
        self.copy_stream = None
        self.events.clear()

    def held_tensors(self) -> list[Tensor]:
        """Every tensor the engine itself keeps alive (host copies, packed buffers, device copies, arena)."""
        held = [arena.current for arena in (self.arena, self.demand_arena) if arena.current is not None]
        if self.ring is not None:
            held += [slot.buffer for slot in self.ring.slots if slot.buffer is not None]
        for group in [*self.groups.values(), *self.demanded.values()]:
            held += [t for t in (group.packed_host, group.packed_device) if t is not None]
            held += [slot.host for slot in group.slots if slot.host is not None]
        return held


    def pinned_bytes(self) -> int:
        """Page-locked host bytes the engine holds: packed pinned copies and the ring's slots (the report's column)."""
        if self.device.type != "cuda":
            return 0
        packed = sum(g.packed_host.numel() for g in self.groups.values() if g.packed_host is not None and self.host_of(g) == "pinned")
        return packed + (self.ring.pinned_bytes() if self.ring is not None else 0)

"""Weight storage (`--weights fp16|bf16|fp8|int8`): which layers keep their weight in a storage dtype
other than the compute dtype, the one rule that keeps some in the compute dtype, the tensor source that
hands the memory engine the stored form, and the report of what went where.

The stored form lives everywhere the engine keeps weights (the host copy, pinned or not, the packed
buffers it streams, the device copies of resident groups), because the engine is given it as the
checkpoint's own dtype (`OffloadEngine.keep_dtype`). 8-bit weights come with `<key>_scale` tensors
(one per output channel, `models.ops.quantize`); the op layer dequantises per layer at compute, so the
compute dtype and the memory modes are unchanged.

A file whose op-layer weights are already 8-bit floats (BFL's and ComfyUI's fp8 Flux, `t5xxl_fp8_e4m3fn`) takes the
same path with or without `--weights`: those weights keep the file's bytes (no 16-bit copy is ever made) and the op
layer casts each to the compute dtype at its call (no scale: the file's values are the weights), or, for ComfyUI's
mixed-precision files (`weights.loading.check_comfy_fp8`), times the file's `<layer>.weight_scale` (one per tensor,
placed as one per output channel: the same scale buffer `--weights fp8` gives a layer). GGUF files: the op
layers whose weight a GGUF file holds as quantized blocks keep those blocks the same way (`hold_gguf_weights`,
`WeightStorage.gguf`): the engine moves their bytes and the op layer dequantises them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn

from optimized_sd.errors import FieldError
from optimized_sd.models.ops import SCALE, WeightOp, quantize
from optimized_sd.pipelines.placement import UNET, text_root
from optimized_sd.weights.sources import TensorSource

WEIGHT_KINDS = ("fp16", "bf16", "fp8", "int8")
FP8 = getattr(torch, "float8_e4m3fn", None)  # e4m3: more mantissa than e5m2, and the per-channel scale supplies the range
FLOAT8 = frozenset(filter(None, (FP8, getattr(torch, "float8_e5m2", None))))  # 8-bit floats a file may store
STORAGE_DTYPES: dict[str, torch.dtype | None] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": FP8, "int8": torch.int8}

FIRST_AND_LAST_CONVS = (f"{UNET}.input_blocks.0.0", f"{UNET}.out.2")  # conv_in and conv_out of the UNet
EMBEDDINGS = (f"{UNET}.time_embed", f"{UNET}.label_emb")
VAE_END_CONVS = ("conv_in", "conv_out", "quant_conv")  # each VAE half's first and last conv (post_quant_conv included)


def keeps_compute_dtype(path: str) -> str | None:
    """The keep-16-bit rule: why the op layer (Linear/Conv2d) at `path` keeps its weight in the compute
    dtype, or None when it is stored as `--weights` says. Kept: the first and last convs of the UNet and
    of each VAE half (where pixels and latents enter and leave, and the layers are small) and the timestep
    and class embeddings. Norms, biases and the text encoder (transformers' own layers, not the op layer)
    are never stored otherwise."""
    if path in FIRST_AND_LAST_CONVS:
        return "first/last conv of the UNet"
    if path.startswith(EMBEDDINGS):
        return "embedding"
    if path.startswith("first_stage_model.") and path.rsplit(".", 1)[-1].endswith(VAE_END_CONVS):
        return "first/last conv of the VAE"
    return None


def check_weight_kind(kind: str | None) -> None:
    """A `--weights` value is a known kind (or None: the compute dtype), before anything is loaded."""
    if kind is not None and kind not in WEIGHT_KINDS:
        raise FieldError.about("weights", f"{kind!r} is unknown; use {', '.join(WEIGHT_KINDS)}")


def storage_dtype(kind: str, device_type: str) -> torch.dtype:
    """The torch dtype of a `--weights` kind, checked for this device (a FieldError otherwise)."""
    check_weight_kind(kind)
    dtype = STORAGE_DTYPES[kind]
    if dtype is None or (kind == "fp8" and device_type == "mps"):
        raise FieldError.about("weights", "fp8 needs torch.float8_e4m3fn, which this torch build or device lacks; use int8")
    return dtype


@dataclass(frozen=True)
class WeightStorage:
    """Which weights are stored how. `stored`: checkpoint keys of the op-layer weights kept in `dtype`;
    `kept`: the other op-layer weights (kept in the compute dtype) with the rule's reason; `native`: op-layer
    weights the file already holds as 8-bit floats, kept in that dtype (unscaled) whatever `kind` says."""

    kind: str | None = None
    dtype: torch.dtype | None = None
    stored: tuple[str, ...] = ()
    kept: dict[str, str] = field(default_factory=dict)
    native: dict[str, torch.dtype] = field(default_factory=dict)
    gguf: tuple[str, ...] = ()  # op-layer weights kept as a GGUF file's quantized blocks (`hold_gguf_weights`)
    native_scaled: tuple[str, ...] = ()  # `native` weights the file scales (`<key>_scale`: ComfyUI's mixed precision)

    @property
    def held(self) -> tuple[str, ...]:
        """Every op-layer weight placed in a form other than the compute dtype (`--weights`, fp8 files, GGUF blocks)."""
        return self.stored + tuple(self.native) + self.gguf

    @property
    def scaled(self) -> bool:
        """8-bit storage: each stored weight has a per-output-channel scale."""
        return self.dtype is not None and self.dtype.itemsize == 1 and bool(self.stored)

    def host_for(self, host: str) -> str:
        """Where weights wait off the device: 8-bit weights are computed from the file (quantised), so
        the RAM-lean `source` strategy, which re-reads the file at every load, keeps a plain CPU copy of
        the 8-bit form instead (half a 16-bit file's bytes) rather than quantising every block every step."""
        return "cpu" if host == "source" and self.scaled else host

    def scale_key(self, key: str) -> str:
        return scale_key(key)

    def placed_bytes(self, key: str, tensor: Tensor, compute_bytes: int) -> int:
        """Bytes a parameter occupies as placed: its stored dtype (plus its scales) or the compute dtype."""
        if key in self.native:
            return tensor.numel() * self.native[key].itemsize
        if key in self.gguf_set:
            return tensor.numel()  # the blocks' bytes (a uint8 tensor)
        if key not in self.stored_set or self.dtype is None:
            return tensor.numel() * compute_bytes
        return tensor.numel() * self.dtype.itemsize + (tensor.shape[0] * compute_bytes if self.scaled else 0)

    @cached_property
    def stored_set(self) -> frozenset[str]:
        return frozenset(self.stored)

    @cached_property
    def gguf_set(self) -> frozenset[str]:
        return frozenset(self.gguf)

    @cached_property
    def held_set(self) -> frozenset[str]:
        return frozenset(self.held)


def scale_key(key: str) -> str:
    return key + SCALE.removeprefix("weight")  # "<layer>.weight" -> "<layer>.weight_scale"


def hold_gguf_weights(model: nn.Module, source: TensorSource) -> tuple[str, ...]:
    """Make each op layer (built on meta) whose weight `source` reads as a GGUF file's quantized blocks keep those
    blocks (`WeightOp.hold_gguf`); returns their keys. A weight the file holds in another shape (a 1x1 conv stored
    as a Linear) or in a float type is read as any tensor is (dequantised or cast)."""
    held = []
    available = set(source.keys())
    for path, module in model.named_modules():
        key = f"{path}.weight"
        if not isinstance(module, WeightOp) or key not in available:
            continue
        record = source.gguf(key)
        if record is not None and tuple(record.shape) == tuple(module.weight.shape):
            module.hold_gguf(torch.empty(record.nbytes, dtype=torch.uint8, device="meta"), record.qtype, record.shape)
            held.append(key)
    return tuple(held)


def file_float8(model: nn.Module, source: TensorSource | None) -> dict[str, torch.dtype]:
    """The op-layer weights `source` holds as 8-bit floats, with their dtype (`WeightStorage.native`)."""
    if source is None:
        return {}
    keys = set(source.keys())
    found = {}
    for path, module in model.named_modules():
        key = f"{path}.weight"
        if isinstance(module, WeightOp) and key in keys and source.dtype(key) in FLOAT8:
            found[key] = source.dtype(key)
    return found


def plan_storage(
    model: nn.Module,
    kind: str | None,
    compute_dtype: torch.dtype,
    device_type: str,
    source: TensorSource | None = None,
    gguf: tuple[str, ...] = (),
) -> WeightStorage:
    """Apply the rule to every op layer of `model` (built on meta is enough) but the text encoder's (stored as
    the file has them), those `source` holds as 8-bit floats (`native`) and those kept as GGUF blocks (`gguf`, from
    `hold_gguf_weights`). A 16-bit kind equal to the compute dtype stores nothing differently (the default
    placement)."""
    native = file_float8(model, source)
    keys = set(source.keys()) if native and source is not None else set()
    scaled = tuple(key for key in native if scale_key(key) in keys)
    if kind is None:
        return WeightStorage(native=native, gguf=gguf, native_scaled=scaled)
    dtype = storage_dtype(kind, device_type)
    stored, kept = [], {}
    text = text_root(model) + "."
    for path, module in model.named_modules():
        key = f"{path}.weight"
        if isinstance(module, WeightOp) and key not in native and key not in gguf and not path.startswith(text):
            reason = keeps_compute_dtype(path)
            if reason is None:
                stored.append(f"{path}.weight")
            else:
                kept[f"{path}.weight"] = reason
    if dtype == compute_dtype:
        stored, kept = [], {}
    return WeightStorage(kind, dtype, tuple(stored), kept, native, gguf, scaled)


def apply_storage(model: nn.Module, storage: WeightStorage) -> None:
    """Give exactly the 8-bit layers their scale buffer (on meta; the engine fills it), removing stale ones: those
    `--weights` quantises and the fp8 ones a file scales."""
    scaled = (storage.stored_set if storage.scaled else frozenset()) | set(storage.native_scaled)
    for path, module in model.named_modules():
        if isinstance(module, WeightOp):
            if f"{path}.weight" in scaled:
                module.add_weight_scale()
            else:
                module._buffers.pop(SCALE, None)  # type: ignore[attr-defined]


class StoredSource(TensorSource):
    """The checkpoint as the memory engine places it under `storage`: stored weights report their storage
    dtype (the engine casts into it: 16-bit kinds), 8-bit ones are quantised when read, with their scale
    under `<key>_scale`; a file's own fp8 scales (`native_scaled`) are one per output channel (float32); GGUF-held
    weights are their blocks' bytes (uint8, 1-D); everything else is the inner source's. A scale read right after its
    weight (the engine's order) comes from that same quantisation."""

    def __init__(self, inner: TensorSource, storage: WeightStorage) -> None:
        self.inner = inner
        self.storage = storage
        self.stored = storage.stored_set
        self.gguf = storage.gguf_set
        self.scales = {storage.scale_key(key): key for key in storage.stored} if storage.scaled else {}
        self.file_scales = {scale_key(key): key for key in storage.native_scaled}  # scale key -> its fp8 weight
        self._pending: dict[str, Tensor] = {}  # scale key -> scale of the weight just quantised

    def keys(self) -> list[str]:
        return [*self.inner.keys(), *self.scales]

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.scales or key in self.file_scales:
            return (self.inner.shape(self.scales.get(key) or self.file_scales[key])[0],)
        if key in self.gguf:
            return (self.inner.gguf(key).nbytes,)
        return self.inner.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        if key in self.gguf:
            return torch.uint8
        if key in self.scales or key in self.file_scales:
            return torch.float32
        if key in self.stored and self.storage.dtype is not None:
            return self.storage.dtype
        return self.inner.dtype(key)

    def get(self, key: str) -> Tensor:
        assert self.storage.dtype is not None or not (self.stored or self.scales)
        if key in self.gguf:
            return self.inner.gguf(key).raw
        if key in self.file_scales:  # one per tensor or per row (`check_comfy_fp8`): one per output channel
            scale = self.inner.get(key).float().reshape(-1)
            return scale.expand(self.shape(key)[0]).contiguous()
        if key in self.scales:
            pending = self._pending.pop(key, None)
            return pending if pending is not None else quantize(self.inner.get(self.scales[key]), self.storage.dtype)[1]
        value = self.inner.get(key)
        if key not in self.stored or not self.scales:
            return value  # as read; the engine casts it to `dtype(key)`
        q, scale = quantize(value, self.storage.dtype)
        self._pending[self.storage.scale_key(key)] = scale
        return q

    def release(self, keys: Iterable[str]) -> None:
        self.inner.release(key for key in keys if key not in self.scales)

    def close(self) -> None:
        self._pending.clear()
        self.inner.close()


def describe_storage(checkpoint: Path, kind: str) -> str:
    """`optimized-sd inspect --weights KIND`: the report for a checkpoint's model, built on meta (no weights
    read). Sizes are against fp16 compute for 8-bit kinds (the GPU's default) and fp32 for 16-bit ones (the CPU's)."""
    from optimized_sd.weights.loading import prepare_model

    check_weight_kind(kind)
    compute = torch.float16 if STORAGE_DTYPES[kind] is None or STORAGE_DTYPES[kind].itemsize == 1 else torch.float32
    loaded = prepare_model(checkpoint)
    try:
        storage = plan_storage(loaded.model, kind, compute, "cpu")
        return f"against {str(compute).split('.')[-1]} compute\n" + storage_report(loaded.model, storage, compute.itemsize)
    finally:
        loaded.source.close()


def storage_report(model: nn.Module, storage: WeightStorage, compute_bytes: int = 2) -> str:
    """Which layers are stored how, and the weight bytes of each part before and after (the compute
    dtype's size `compute_bytes` for everything not stored otherwise)."""
    if storage.kind is None:
        return "weights: stored in the compute dtype (no --weights)" + (f"; {len(storage.gguf)} as GGUF blocks" if storage.gguf else "")
    lines = [f"weights {storage.kind}: {len(storage.stored)} Linear/Conv2d weights stored as {str(storage.dtype).split('.')[-1]}"
             + (" with per-output-channel scales" if storage.scaled else "") + f"; {len(storage.kept)} kept in the compute dtype"]
    if not storage.stored:
        lines[0] = f"weights {storage.kind}: the compute dtype already; nothing is stored differently"
    for part, prefix in (("UNet", UNET), ("VAE", "first_stage_model"), ("text encoder", text_root(model))):
        named = [(f"{prefix}.{name}", p) for name, p in model.get_submodule(prefix).named_parameters()]
        before = sum(p.numel() for _, p in named) * compute_bytes
        after = sum(storage.placed_bytes(key, p, compute_bytes) for key, p in named)
        count = sum(1 for key, _ in named if key in storage.stored_set)
        lines.append(f"  {part:<13} {before / 2**20:9.1f} MiB -> {after / 2**20:9.1f} MiB  ({count} weights stored)")
    lines.append("  kept in the compute dtype (the keep-16-bit rule), besides norms, biases and the text encoder:")
    lines += [f"    {key}  ({reason})" for key, reason in storage.kept.items()]
    return "\n".join(lines)

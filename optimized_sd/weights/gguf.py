"""GGUF files (llama.cpp's format, used for quantized diffusion models by ComfyUI-GGUF and stable-diffusion.cpp):
a validated reader over one read-only memory map.

Layout (all little-endian): "GGUF", version (uint32: 2 or 3), tensor count and metadata count (uint64 each),
the metadata (key string, uint32 value type, value; strings are a uint64 length and UTF-8 bytes, arrays a
uint32 element type, a uint64 count and the elements), the tensor infos (name, uint32 n_dims, n_dims uint64
sizes innermost first, uint32 GGML type, uint64 offset into the data section), padding to `general.alignment`
(default 32), then the data section, each tensor's bytes at an aligned offset.

The header is untrusted input, checked as the safetensors header is (`sources.parse_safetensors_header`):
counts, string and array lengths, dimensions and sizes are bounded before anything is built from them,
every tensor must lie inside the file at an aligned offset without overlapping another, and each problem
is one CheckpointError line naming the file. Tensor bytes are never read here: `GgufTensor.raw` is a
zero-copy view of the mapping.

ComfyUI-GGUF conventions: `general.architecture` names the model ("flux", "sdxl", "sd1"...), tensors keep the
denoiser's own names (no `model.diffusion_model.` prefix), and SD 1.x/SDXL weights whose innermost size is
not a multiple of 256 are stored as (n/256, 256) with their real shape in `comfy.gguf.orig_shape.<name>`;
`GgufTensor.shape` is that real shape. stable-diffusion.cpp's files carry no such keys and keep their shapes.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from optimized_sd.errors import CheckpointError
from optimized_sd.ggml_quants import FLOAT_TYPES, GGML_TYPES, SUPPORTED_NAMES, GgmlType, dequantize, tensor_nbytes, type_name
from optimized_sd.weights.family import UNET_PREFIX
from optimized_sd.weights.sources import TensorSource, open_regular_file

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 used 32-bit counts and lengths; llama.cpp dropped it in 2023
DEFAULT_ALIGNMENT = 32
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."

# Bounds on what a header may ask for. Real files: a few thousand tensors, a few hundred keys, tokenizer arrays
# of up to ~300k strings and headers of a few MiB (an LLM's vocabulary); a diffusion model's header is KiB.
MAX_TENSORS = 100_000
MAX_KEYS = 100_000
MAX_KEY_LENGTH = 65_535  # the spec's limit on keys
MAX_NAME_LENGTH = 1024  # GGML's own limit is 64 (128 in stable-diffusion.cpp's build)
MAX_STRING_LENGTH = 16 * 2**20
MAX_ARRAY_LENGTH = 16 * 2**20
MAX_ARRAY_DEPTH = 4  # arrays of arrays are allowed by the spec; nesting deeper is refused
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 2**48
HEADER_LIMIT = 32 * 2**20  # everything before the data section
MAX_ALIGNMENT = 2**20

# Metadata value types: number -> (struct format, name); 8 is a string, 9 an array.
_SCALARS = {0: ("<B", "uint8"), 1: ("<b", "int8"), 2: ("<H", "uint16"), 3: ("<h", "int16"), 4: ("<I", "uint32"),
            5: ("<i", "int32"), 6: ("<f", "float32"), 7: ("<?", "bool"), 10: ("<Q", "uint64"), 11: ("<q", "int64"),
            12: ("<d", "float64")}
_STRING, _ARRAY = 8, 9
_INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
_ARRAY_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


def is_gguf_file(path: Path) -> bool:
    """True when the file is named `.gguf` or starts with GGUF's magic (a regular file only: see open_regular_file)."""
    if Path(path).suffix.lower() == ".gguf":
        return True
    with open_regular_file(Path(path)) as handle:
        try:
            return handle.read(4) == MAGIC
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's record. `shape` is the logical (torch-order) shape, `stored_shape` the file's dims in torch
    order (they differ under ComfyUI-GGUF's `orig_shape`); `offset` is absolute in the file."""

    name: str
    ggml_type: GgmlType
    shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    offset: int
    nbytes: int
    _buffer: Any = field(default=None, repr=False, compare=False)

    @property
    def qtype(self) -> int:
        return self.ggml_type.number

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES

    @property
    def raw(self) -> Tensor:
        """The tensor's bytes as a 1-D uint8 view of the read-only mapping (copy before writing)."""
        if self._buffer is None:
            raise CheckpointError(f"tensor {self.name!r}: its GGUF file is closed")
        with warnings.catch_warnings():  # the mapping is read-only; callers copy before writing
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._buffer, dtype=torch.uint8, count=self.nbytes, offset=self.offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The values in `dtype`, shaped `shape` (F32/F16/BF16 in their own dtype are views of the mapping)."""
        return dequantize(self.raw, self.qtype, self.shape, dtype)

    def stored(self) -> Tensor:
        """What a layer holds: F32/F16/BF16 as a typed view shaped `shape`, quantized types as their raw bytes."""
        if self.quantized:
            return self.raw
        return self.raw.view(FLOAT_TYPES[self.qtype]).view(self.shape)


@dataclass
class GgufFile:
    """A read GGUF file: its metadata (key -> int, float, bool, str or list), tensor records and one mapping."""

    path: Path
    version: int
    alignment: int
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensor]
    data_start: int
    file_size: int
    _mapping: mmap.mmap | None = field(default=None, repr=False)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def state_dict(self, dequantize: bool = True) -> dict[str, Tensor]:
        """Every tensor by name: dequantised to float32 (new tensors; float32 ones are views), or as stored
        (`GgufTensor.stored`: typed views for float types, raw bytes for quantized ones)."""
        return {name: info.dequantize() if dequantize else info.stored() for name, info in self.tensors.items()}

    def type_bytes(self) -> dict[str, tuple[int, int]]:
        """GGML type name -> (tensors, bytes), largest share first."""
        totals: dict[str, tuple[int, int]] = {}
        for info in self.tensors.values():
            count, size = totals.get(info.type_name, (0, 0))
            totals[info.type_name] = (count + 1, size + info.nbytes)
        return dict(sorted(totals.items(), key=lambda item: -item[1][1]))

    def close(self) -> None:
        """Drop the mapping (views already taken keep it alive until they go)."""
        self._mapping = None
        self.tensors = {name: _detached(info) for name, info in self.tensors.items()}


def _detached(info: GgufTensor) -> GgufTensor:
    return GgufTensor(info.name, info.ggml_type, info.shape, info.stored_shape, info.offset, info.nbytes)


class _Header:
    """A bounded cursor over the header bytes: every read is checked against the file's end and the header limit."""

    def __init__(self, path: Path, data: mmap.mmap, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def refuse(self, problem: str) -> CheckpointError:
        return _refuse(self.path, problem)

    def take(self, count: int, what: str) -> int:
        """Claim `count` bytes at the cursor; returns where they start."""
        start, end = self.pos, self.pos + count
        if end > self.size:
            raise CheckpointError(f"{self.path} is truncated: {what} at byte {start} runs past the end of the {self.size}-byte file")
        if end > HEADER_LIMIT:
            raise CheckpointError(f"{self.path}: GGUF header runs past the {HEADER_LIMIT // 2**20} MiB limit ({what}); refused")
        self.pos = end
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, limit: int, item_bytes: int) -> int:
        """A uint64 count of items of at least `item_bytes` each, bounded by `limit` and by the bytes left."""
        value = self.scalar("<Q", what)
        if value > limit:
            raise self.refuse(f"{what} is {value} (at most {limit})")
        if value * item_bytes > self.size - self.pos:
            raise CheckpointError(f"{self.path} is truncated: {what} {value} needs more than the {self.size - self.pos} bytes left")
        return value

    def string(self, what: str, limit: int, strict: bool = True) -> str:
        length = self.count(f"length of {what}", limit, 1)
        raw = self.data[self.take(length, what) : self.pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                raise self.refuse(f"{what} is not UTF-8 text") from None
            return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind][0], what)
        if kind == _STRING:
            return self.string(what, MAX_STRING_LENGTH, strict=False)
        if kind != _ARRAY:
            raise self.refuse(f"{what} has unknown value type {kind}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.refuse(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        element = self.scalar("<I", f"element type of {what}")
        if element in _ARRAY_NUMPY:  # numbers in one go, not one struct call each
            dtype = np.dtype(_ARRAY_NUMPY[element])
            length = self.count(f"length of {what}", MAX_ARRAY_LENGTH, dtype.itemsize)
            items = np.frombuffer(self.data, dtype, length, self.take(length * dtype.itemsize, what)).tolist()
            return [bool(item) for item in items] if element == 7 else items
        if element not in (_STRING, _ARRAY):
            raise self.refuse(f"{what} has unknown element type {element}")
        length = self.count(f"length of {what}", MAX_ARRAY_LENGTH, 8)
        return [self.value(element, what, depth + 1) for _ in range(length)]


def _refuse(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: malformed GGUF file: {problem}")


def _read_metadata(header: _Header, count: int) -> tuple[dict[str, Any], dict[str, int]]:
    """Key -> value, and key -> value type (to tell an int array from a float one)."""
    metadata: dict[str, Any] = {}
    kinds: dict[str, int] = {}
    for index in range(count):
        key = header.string(f"metadata key {index}", MAX_KEY_LENGTH)
        if key in metadata:
            raise header.refuse(f"metadata key {key[:80]!r} appears twice")
        kind = header.scalar("<I", f"value type of {key[:80]!r}")
        element = None
        if kind == _ARRAY and header.pos + 4 <= header.size:
            element = struct.unpack_from("<I", header.data, header.pos)[0]
        metadata[key] = header.value(kind, f"metadata {key[:80]!r}")
        kinds[key] = kind if element is None else 100 + element  # 100+: an array of that element type
    return metadata, kinds


def _alignment(path: Path, metadata: dict[str, Any], kinds: dict[str, int]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    if kinds["general.alignment"] not in _INTEGER_TYPES or not 0 < value <= MAX_ALIGNMENT or value & (value - 1):
        raise _refuse(path, f"general.alignment {value!r} is not a power of two up to {MAX_ALIGNMENT}")
    return value


def _orig_shape(path: Path, name: str, metadata: dict[str, Any], kinds: dict[str, int], stored: tuple[int, ...]) -> tuple[int, ...]:
    """ComfyUI-GGUF's `comfy.gguf.orig_shape.<name>` (an integer array, torch order), checked against the stored shape."""
    key = ORIG_SHAPE_PREFIX + name
    if key not in metadata:
        return stored
    shape = metadata[key]
    if kinds[key] - 100 not in _INTEGER_TYPES or not 0 < len(shape) <= MAX_DIMS or not all(d > 0 for d in shape):
        raise _refuse(path, f"{key} is not a list of 1 to {MAX_DIMS} sizes > 0")
    if math.prod(shape) != math.prod(stored):
        raise _refuse(path, f"{key} {tuple(shape)} does not hold the {math.prod(stored)} values of tensor {name!r} {stored}")
    return tuple(shape)


def _tensor_type(path: Path, name: str, number: int) -> GgmlType:
    ggml_type = GGML_TYPES.get(number)
    if ggml_type is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} uses GGML type {number} ({type_name(number)}), not supported; supported: {SUPPORTED_NAMES}"
        )
    return ggml_type


def _read_tensor_infos(header: _Header, count: int) -> list[tuple[str, tuple[int, ...], GgmlType, int]]:
    """(name, stored shape in torch order, type, offset in the data section) of each tensor, bounded."""
    infos, names = [], set()
    for index in range(count):
        name = header.string(f"name of tensor {index}", MAX_NAME_LENGTH)
        if name in names:
            raise header.refuse(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = header.scalar("<I", f"dimension count of {name!r}")
        if not 0 < n_dims <= MAX_DIMS:
            raise header.refuse(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [header.scalar("<Q", f"dimensions of {name!r}") for _ in range(n_dims)]  # innermost first
        if not all(0 < d <= MAX_ELEMENTS for d in dims) or math.prod(dims) > MAX_ELEMENTS:
            raise header.refuse(f"tensor {name!r} has dimensions {dims}: each must be > 0, at most {MAX_ELEMENTS} values in all")
        ggml_type = _tensor_type(header.path, name, header.scalar("<I", f"type of {name!r}"))
        if dims[0] % ggml_type.block_size:
            raise header.refuse(
                f"tensor {name!r}: its innermost size {dims[0]} is not a multiple of {ggml_type.name}'s block of {ggml_type.block_size}"
            )
        offset = header.scalar("<Q", f"offset of {name!r}")
        infos.append((name, tuple(reversed(dims)), ggml_type, offset))
    return infos


def _place_tensors(
    path: Path, infos: list[tuple[str, tuple[int, ...], GgmlType, int]], metadata: dict[str, Any], kinds: dict[str, int],
    alignment: int, data_start: int, size: int, buffer: Any,
) -> dict[str, GgufTensor]:
    """Check each tensor's offset (aligned, inside the file) and that no two overlap; build the records."""
    tensors = {}
    for name, stored, ggml_type, offset in infos:
        if offset % alignment:
            raise _refuse(path, f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment {alignment}")
        nbytes = tensor_nbytes(ggml_type, math.prod(stored))
        if data_start + offset + nbytes > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + offset + nbytes} of the {size}-byte file"
            )
        shape = _orig_shape(path, name, metadata, kinds, stored)
        tensors[name] = GgufTensor(name, ggml_type, shape, stored, data_start + offset, nbytes, buffer)
    previous: GgufTensor | None = None
    for info in sorted(tensors.values(), key=lambda t: t.offset):
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise _refuse(path, f"tensor {info.name!r} overlaps tensor {previous.name!r}")
        if previous is None or info.offset + info.nbytes > previous.offset + previous.nbytes:
            previous = info
    return tensors


def read_gguf(path: Path | str) -> GgufFile:
    """Open and validate a GGUF file (header only; tensor bytes stay in the mapping until used)."""
    path = Path(path)
    with open_regular_file(path) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                head = handle.read(4)
                if head != MAGIC:
                    raise CheckpointError(f"{path}: not a GGUF file (it starts with {head!r}, not {MAGIC!r})")
                raise CheckpointError(f"{path} is truncated: a GGUF header needs 24 bytes, the file holds {size}")
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    header = _Header(path, mapping, size)
    if mapping[:4] != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {mapping[:4]!r}, not {MAGIC!r})")
    header.pos = 4
    version = header.scalar("<I", "version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        detail = "big-endian GGUF files are not read" if swapped in VERSIONS else f"only versions {VERSIONS[0]} and {VERSIONS[1]} are read"
        raise CheckpointError(f"{path}: unsupported GGUF version {version} ({detail})")
    tensor_count = header.count("tensor count", MAX_TENSORS, 8 + 4 + 8 + 4 + 8)  # the smallest tensor info
    key_count = header.count("metadata count", MAX_KEYS, 8 + 4 + 1)  # the smallest key/value
    metadata, kinds = _read_metadata(header, key_count)
    infos = _read_tensor_infos(header, tensor_count)
    alignment = _alignment(path, metadata, kinds)
    data_start = -(-header.pos // alignment) * alignment
    if tensor_count and data_start > size:
        raise CheckpointError(f"{path} is truncated: its data section would start at byte {data_start} of the {size}-byte file")
    tensors = _place_tensors(path, infos, metadata, kinds, alignment, data_start, size, mapping)
    return GgufFile(path, version, alignment, metadata, tensors, data_start, size, mapping)


class GgufSource(TensorSource):
    """A GGUF file as a tensor source under its own names and logical shapes: tensors are dequantised to
    float32 when read (float types keep their dtype as views of the mapping); `gguf(key)` hands the quantized
    ones' records to whoever keeps them as blocks (`pipelines.weight_storage.hold_gguf_weights`)."""

    def __init__(self, path: Path | str) -> None:
        self.file = read_gguf(path)
        self.metadata = {key: str(value) for key, value in self.file.metadata.items() if not isinstance(value, list)}

    def keys(self) -> list[str]:
        return list(self.file.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.tensors[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return FLOAT_TYPES.get(self.file.tensors[key].qtype, torch.float32)

    def get(self, key: str) -> Tensor:
        info = self.file.tensors[key]
        return info.dequantize(self.dtype(key))

    def gguf(self, key: str) -> GgufTensor | None:
        info = self.file.tensors[key]
        return info if info.quantized else None

    def release(self, keys: Iterable[str]) -> None:
        mapping = self.file._mapping
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        for key in keys:
            info = self.file.tensors[key]
            start = info.offset - info.offset % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def close(self) -> None:
        self.file.close()


# `general.architecture` of ComfyUI-GGUF's files (tools/convert.py, loader.py) -> what the model is. ComfyUI-GGUF
# names no Flux.2 or Z-Image architecture: a Flux.2 transformer converts as "flux" (it has `double_blocks.`) and
# Z-Image's as "lumina2" (its `cap_embedder.1` and `context_refiner.`), told from Lumina 2 by its keys here.
RUN_ARCHITECTURES = {"flux": "Flux.1 or Flux.2 klein", "sdxl": "SDXL", "sd1": "SD 1.x", "lumina2": "Z-Image",
                     "qwen3": "a Qwen3 text encoder"}  # fmt: skip
OTHER_ARCHITECTURES = {
    "sd3": "Stable Diffusion 3", "aura": "AuraFlow", "hidream": "HiDream", "cosmos": "Cosmos Predict2", "ltxv": "LTX-Video",
    "hyvid": "HunyuanVideo", "wan": "Wan", "chroma": "Chroma", "qwen_image": "Qwen-Image",
    "t5": "a T5 text encoder", "t5encoder": "a T5 text encoder", "llama": "a Llama text encoder",
    "qwen2vl": "a Qwen2.5-VL text encoder", "qwen3vl": "a Qwen3-VL text encoder",
}  # fmt: skip
SD_ARCHITECTURES = ("sdxl", "sd1")
# llama.cpp's tensor names in a Qwen3 GGUF -> transformers' (`Qwen3ForCausalLM`): per block `blk.N.<part>.<leaf>`,
# and the top-level ones. Qwen3 uses NeoX RoPE in llama.cpp, so q and k are stored unpermuted (only "llama" permutes).
LLAMA_CPP_BLOCK_PARTS = {
    "attn_norm": "input_layernorm", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
LLAMA_CPP_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def transformers_name(name: str) -> str:
    """A llama.cpp tensor name under transformers' names (unknown ones unchanged: reported as unexpected later)."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LLAMA_CPP_BLOCK_PARTS:
        return f"model.layers.{parts[1]}.{LLAMA_CPP_BLOCK_PARTS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in LLAMA_CPP_TOP:
        return f"{LLAMA_CPP_TOP[parts[0]]}.{parts[1]}"
    return name


def gguf_model_source(path: Path | str) -> GgufSource:
    """A GGUF file opened as (part of) a model: ComfyUI-GGUF's denoiser files, whose `general.architecture` must be
    one this version runs, under the names a checkpoint gives them (an SD UNet's under `model.diffusion_model.`,
    which ComfyUI-GGUF drops; Flux.1, Flux.2 and Z-Image keep their original names); a Qwen3 text encoder in
    llama.cpp's names (renamed to transformers'); or stable-diffusion.cpp's files, which say no architecture and
    keep the source checkpoint's names. Anything else is a one-line CheckpointError."""
    from optimized_sd.weights.zimage_keys import ORIGINAL_TELLTALE as ZIMAGE_TELLTALE  # Lumina 2 lacks it

    source = GgufSource(path)
    path = Path(path)
    architecture = source.file.metadata.get("general.architecture")
    if architecture is None or architecture in ("flux",):
        return source
    if architecture == "lumina2" and not any(key.endswith(ZIMAGE_TELLTALE) for key in source.keys()):
        source.close()
        raise CheckpointError(f"{path}: a GGUF of architecture 'lumina2' holding Lumina 2 (no Z-Image {ZIMAGE_TELLTALE}), "
                              "which this version does not run")  # fmt: skip
    if not isinstance(architecture, str) or architecture not in RUN_ARCHITECTURES:
        what = OTHER_ARCHITECTURES.get(str(architecture), "not a model this version knows")
        runs = ", ".join(f"{name} ({arch})" for arch, name in RUN_ARCHITECTURES.items())
        source.close()
        raise CheckpointError(
            f"{path}: a GGUF of architecture {str(architecture)[:40]!r} ({what}), which this version does not run; it runs {runs}"
        )
    if architecture == "qwen3":
        source.file.tensors = {transformers_name(name): info for name, info in source.file.tensors.items()}
        return source
    if architecture == "lumina2":
        return source
    keys = source.keys()
    if any(key.startswith(("down_blocks.", "up_blocks.")) for key in keys):
        source.close()
        raise CheckpointError(f"{path}: a GGUF of a diffusers-named UNet, which is not read; convert the original (LDM) checkpoint")
    if not any(key.removeprefix(UNET_PREFIX) == "input_blocks.0.0.weight" for key in keys):
        source.close()
        raise CheckpointError(f"{path}: a GGUF of architecture {architecture!r} that holds no {RUN_ARCHITECTURES[architecture]} UNet "
                              "(no input_blocks.0.0.weight)")
    if not all(key.startswith(UNET_PREFIX) for key in keys):
        source.file.tensors = {UNET_PREFIX + name: info for name, info in source.file.tensors.items()}
    return source

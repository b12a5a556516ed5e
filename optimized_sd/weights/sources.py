"""Tensor sources: read-only views of a checkpoint's tensors by name, without building a model.

A safetensors file is memory-mapped and each tensor is a zero-copy view into the mapping, so loading
never holds a second full copy in RAM; `release` hands a tensor's pages back to the kernel so a
streamed model's resident set stays at the size of what is in use.

The safetensors header is untrusted input: `parse_safetensors_header` is the one validator (the loader,
`inspect` and the benchmark's model cache all go through `SafetensorsSource`), and every problem is a
one-line CheckpointError naming the tensor. Files are opened only once they are known to be regular
files (`open_regular_file`), so a FIFO or a device given as a checkpoint is refused instead of blocking.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from optimized_sd.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# A safetensors header is JSON that Python turns into objects ~10x its size; SD-sized models need well under 1 MiB.
SAFETENSORS_HEADER_LIMIT = 16 * 2**20
# More dimensions than any weight has; bounds the work a crafted shape can ask for.
MAX_TENSOR_DIMS = 32


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def open_regular_file(path: Path) -> BinaryIO:
    """Open `path` for reading only if it is a regular file (a symlink to one is fine).

    The type is checked with stat before opening (opening a FIFO blocks until a writer comes) and again on the
    open descriptor, which is opened non-blocking, so nothing swapped in between can hang the process."""
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(before.st_mode):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file (a diffusers folder needs the diffusers reader)")
    if not stat.S_ISREG(before.st_mode):
        raise CheckpointError(f"{path}: is a {_file_kind(before.st_mode)}, not a regular file; refused without reading it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is a {_file_kind(mode)}, not a regular file; refused without reading it")
    return os.fdopen(fd, "rb")


@dataclass(frozen=True)
class SafetensorsEntry:
    """One validated tensor record: where its bytes lie relative to the start of the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _refuse(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: malformed safetensors header: {problem}")


def _header_json(path: Path, raw: bytes) -> dict[str, Any]:
    """Parse the header text: a JSON object, no duplicate keys, no NaN/Infinity, integers of at most 20 digits."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise _refuse(path, f"key {duplicate!r} appears twice")
        return out

    def bounded_int(text: str) -> int:
        if len(text.lstrip("-")) > 20:
            raise _refuse(path, f"integer {text[:24]}... is too large")
        return int(text)

    def no_constant(text: str) -> Any:
        raise _refuse(path, f"{text} is not allowed")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_int=bounded_int,
                            parse_constant=no_constant)
    except UnicodeDecodeError:
        raise _refuse(path, "it is not UTF-8 text") from None
    except RecursionError:
        raise _refuse(path, "it nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError
        raise _refuse(path, f"not JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(header, dict):
        raise _refuse(path, f"it is a JSON {type(header).__name__}, not an object")
    return header


def _plain_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass; true/false are not sizes


def _entry(path: Path, key: str, entry: Any, data_size: int) -> SafetensorsEntry:
    """Check one tensor record against the spec and against the data section's size."""
    if not isinstance(entry, dict):
        raise _refuse(path, f"tensor {key!r} is a JSON {type(entry).__name__}, not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise _refuse(path, f"tensor {key!r} has unknown dtype {str(dtype_name)[:20]!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    if not isinstance(shape, list) or not all(_plain_int(d) and d >= 0 for d in shape):
        raise _refuse(path, f"tensor {key!r} has shape {str(shape)[:60]}, not a list of sizes >= 0")
    if len(shape) > MAX_TENSOR_DIMS:
        raise _refuse(path, f"tensor {key!r} has {len(shape)} dimensions (at most {MAX_TENSOR_DIMS})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_plain_int(o) for o in offsets)):
        raise _refuse(path, f"tensor {key!r} has data_offsets {str(offsets)[:60]}, not two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _refuse(path, f"tensor {key!r} has data_offsets [{begin}, {end}]: begin must be >= 0 and <= end")
    needed = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if end - begin != needed:
        raise _refuse(path, f"tensor {key!r} holds {end - begin} bytes, but shape {tuple(shape)} of {dtype_name} needs {needed}")
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {key!r} ends at byte {end} of the data, the file holds {data_size} data bytes"
        )
    return SafetensorsEntry(dtype, tuple(shape), begin, end)


def parse_safetensors_header(path: Path, raw: bytes, data_size: int) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    """Validate a safetensors header (`raw`, the JSON bytes) for a data section of `data_size` bytes.

    Returns the tensor records by name and the `__metadata__` (str -> str). Gaps between tensors are allowed,
    overlaps are not (two names for the same bytes would let one write show up in another tensor)."""
    header = _header_json(path, raw)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(path, "__metadata__ must map strings to strings")
    entries = {key: _entry(path, key, value, data_size) for key, value in header.items()}
    previous: tuple[str, int] | None = None
    for key, item in sorted(((k, e) for k, e in entries.items() if e.end > e.begin), key=lambda ke: ke[1].begin):
        if previous is not None and item.begin < previous[1]:
            raise _refuse(path, f"tensor {key!r} overlaps tensor {previous[0]!r} (bytes from {item.begin} to {previous[1]})")
        if previous is None or item.end > previous[1]:
            previous = (key, item.end)
    return entries, metadata


class TensorSource:
    """Name -> tensor lookup with shapes known before any data is read."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        """A CPU tensor; may share memory with the file, so callers copy before writing."""
        raise NotImplementedError

    def release(self, keys: Iterable[str]) -> None:
        """Say that these tensors' file pages are no longer needed (no-op where nothing is mapped)."""

    def gguf(self, key: str) -> Any:  # -> optimized_sd.weights.gguf.GgufTensor | None
        """The GGUF record of a tensor stored there as quantized blocks that this view reads unchanged (so an op
        layer may keep the blocks: `models.ops.WeightOp.hold_gguf`); None for everything else."""
        return None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.shape(key) for key in self.keys()}

    def close(self) -> None:
        """Drop any mapping; tensors already copied out stay valid."""


class DictSource(TensorSource):
    """A source over tensors already in memory (a `.ckpt` state dict, or tests)."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def get(self, key: str) -> Tensor:
        return self.tensors[key]

    def close(self) -> None:
        self.tensors.clear()


CAN_DROP_PAGES = hasattr(mmap, "MADV_DONTNEED")  # file pages can be handed back (not on Windows)


class SafetensorsSource(TensorSource):
    """A memory-mapped `.safetensors` file: the header is validated here (`parse_safetensors_header`), the data
    is reached through one read-only mapping."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open_regular_file(self.path) as handle:
            try:
                size = os.fstat(handle.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{self.path} is not a safetensors file (only {size} bytes)")
                header_len = int.from_bytes(handle.read(8), "little")
                if header_len < 2 or header_len > size - 8:
                    raise CheckpointError(
                        f"{self.path} is not a safetensors file (header length {header_len} does not fit a {size}-byte file)"
                    )
                if header_len > SAFETENSORS_HEADER_LIMIT:
                    raise CheckpointError(
                        f"{self.path}: safetensors header of {header_len} bytes is past the "
                        f"{SAFETENSORS_HEADER_LIMIT // 2**20} MiB limit; refused before reading it"
                    )
                raw = handle.read(header_len)
                self.data_start = 8 + header_len
                self._entries, self.metadata = parse_safetensors_header(self.path, raw, size - self.data_start)
                self._mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size > self.data_start else None
            except OSError as error:
                raise CheckpointError(f"cannot read {self.path}: {error.strerror or error}") from None

    @property
    def data_end(self) -> int:
        """The file offset just past the last tensor's bytes (the file may hold padding after it)."""
        return self.data_start + max((entry.end for entry in self._entries.values()), default=0)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def get(self, key: str) -> Tensor:
        entry = self._entries[key]
        if entry.end == entry.begin or self._mapping is None:
            return torch.empty(entry.shape, dtype=entry.dtype)  # validated: only shapes with a zero size get here
        with warnings.catch_warnings():  # the mapping is read-only; callers copy before writing
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._mapping,
                dtype=entry.dtype,
                count=(entry.end - entry.begin) // entry.dtype.itemsize,
                offset=self.data_start + entry.begin,
            )
        return flat.view(entry.shape)

    def release(self, keys: Iterable[str]) -> None:
        if self._mapping is None or not CAN_DROP_PAGES:
            return
        page = mmap.PAGESIZE
        spans = sorted((self._entries[key].begin, self._entries[key].end) for key in keys)
        start = end = None  # tensors next to each other in the file are handed back in one call
        for begin, stop in spans:
            if begin == stop:
                continue
            if end is not None and begin <= end + page:
                end = max(end, stop)
                continue
            if end is not None:
                self._drop_pages(start, end, page)
            start, end = begin, stop
        if end is not None:
            self._drop_pages(start, end, page)

    def _drop_pages(self, begin: int, end: int, page: int) -> None:
        offset = self.data_start + begin
        first = offset - offset % page
        self._mapping.madvise(mmap.MADV_DONTNEED, first, self.data_start + end - first)

    def close(self) -> None:
        # Tensors viewing the mapping keep it alive through their buffer export, so the mapping is
        # dropped by reference counting rather than closed under them.
        self._mapping = None


class RenamedSource(TensorSource):
    """A view of another source under new names (diffusers -> LDM, EMA selection, prefix fixes)."""

    def __init__(self, inner: TensorSource, names: Mapping[str, str]) -> None:
        """`names` maps each new name to the inner source's name."""
        self.inner = inner
        self.names = dict(names)

    def keys(self) -> list[str]:
        return list(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self.names[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(self.names[key])

    def get(self, key: str) -> Tensor:
        return self.inner.get(self.names[key])

    def gguf(self, key: str) -> Any:
        return self.inner.gguf(self.names[key])

    def release(self, keys: Iterable[str]) -> None:
        self.inner.release([self.names[key] for key in keys])  # a list: `stream` releases tensor by tensor, every step

    def close(self) -> None:
        self.inner.close()


class ChainSource(TensorSource):
    """Several sources seen as one (a diffusers folder's unet, vae and text encoder files)."""

    def __init__(self, parts: Iterable[TensorSource]) -> None:
        self.parts = list(parts)
        self._owner = {key: part for part in self.parts for key in part.keys()}

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._owner[key].dtype(key)

    def get(self, key: str) -> Tensor:
        return self._owner[key].get(key)

    def gguf(self, key: str) -> Any:
        return self._owner[key].gguf(key)

    def release(self, keys: Iterable[str]) -> None:
        by_part: dict[int, tuple[TensorSource, list[str]]] = {}
        for key in keys:
            part = self._owner[key]
            by_part.setdefault(id(part), (part, []))[1].append(key)
        for part, part_keys in by_part.values():
            part.release(part_keys)

    def close(self) -> None:
        for part in self.parts:
            part.close()


class ComputedSource(TensorSource):
    """A view of another source where some names are computed from several inner tensors: OpenCLIP's
    fused `in_proj_weight` from a diffusers tower's q, k and v (`cat`), or its `text_projection` from a
    Linear weight (`transpose`), Flux's final adaLN with diffusers' (scale, shift) halves in BFL's (shift,
    scale) order (`swap_halves`). Shapes are known without reading; tensors are computed when read."""

    def __init__(self, inner: TensorSource, recipes: Mapping[str, tuple[str, tuple[str, ...]]]) -> None:
        """`recipes` maps each new name to (op, inner names); op is `same`, `cat` (along dim 0), `transpose` or
        `swap_halves` (the two halves of dim 0 exchanged)."""
        self.inner = inner
        self.recipes = dict(recipes)

    def keys(self) -> list[str]:
        return list(self.recipes)

    def shape(self, key: str) -> tuple[int, ...]:
        op, names = self.recipes[key]
        shapes = [self.inner.shape(name) for name in names]
        if op == "cat":
            return (sum(shape[0] for shape in shapes), *shapes[0][1:])
        if op == "transpose":
            return tuple(reversed(shapes[0]))
        return shapes[0]

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(self.recipes[key][1][0])

    def get(self, key: str) -> Tensor:
        op, names = self.recipes[key]
        if op == "cat":
            return torch.cat([self.inner.get(name) for name in names])
        if op == "transpose":  # contiguous, so the matmuls round as they do on a file stored transposed
            return self.inner.get(names[0]).t().contiguous()
        if op == "swap_halves":
            first, second = self.inner.get(names[0]).chunk(2)
            return torch.cat([second, first])
        return self.inner.get(names[0])

    def gguf(self, key: str) -> Any:
        op, names = self.recipes[key]
        return self.inner.gguf(names[0]) if op == "same" else None  # a computed tensor is dequantised to compute it

    def release(self, keys: Iterable[str]) -> None:
        self.inner.release(name for key in keys for name in self.recipes[key][1])

    def close(self) -> None:
        self.inner.close()

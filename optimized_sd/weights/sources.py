"""Tensor sources: read-only views of a checkpoint's tensors by name, without building a model.

A safetensors file is memory-mapped and each tensor is a zero-copy view into the mapping, so loading
never holds a second full copy in RAM; `release` hands a tensor's pages back to the kernel so a
streamed model's resident set stays at the size of what is in use."""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

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


class SafetensorsSource(TensorSource):
    """A memory-mapped `.safetensors` file: the header is parsed here (8-byte length, JSON), the data is
    reached through one read-only mapping."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{self.path} is not a safetensors file (only {size} bytes)")
                (header_len,) = struct.unpack("<Q", handle.read(8))
                if header_len > size - 8 or header_len > 100_000_000:
                    raise CheckpointError(f"{self.path} is not a safetensors file (bad header length)")
                header = json.loads(handle.read(header_len))
                self._mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_len else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path} is not a safetensors file (unreadable header)") from None
        except OSError as error:
            raise CheckpointError(f"cannot read {self.path}: {error.strerror or error}") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        data_start = 8 + header_len
        for key, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                begin, end = entry["data_offsets"]
                shape = tuple(entry["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: unsupported or malformed tensor entry {key!r}") from None
            if data_start + end > size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {key!r} ends at byte {data_start + end}, the file has {size}"
                )
            self._entries[key] = (dtype, shape, data_start + begin, end - begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> Tensor:
        dtype, shape, offset, length = self._entries[key]
        if length == 0 or self._mapping is None:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # the mapping is read-only; callers copy before writing
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._mapping, dtype=dtype, count=length // dtype.itemsize, offset=offset)
        return flat.view(shape)

    def release(self, keys: Iterable[str]) -> None:
        if self._mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for key in keys:
            _, _, offset, length = self._entries[key]
            start = offset - offset % page
            if length:
                self._mapping.madvise(mmap.MADV_DONTNEED, start, offset + length - start)

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

    def release(self, keys: Iterable[str]) -> None:
        self.inner.release(self.names[key] for key in keys)

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

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._owner[key].release([key])

    def close(self) -> None:
        for part in self.parts:
            part.close()


class ComputedSource(TensorSource):
    """A view of another source where some names are computed from several inner tensors: OpenCLIP's
    fused `in_proj_weight` from a diffusers tower's q, k and v (`cat`), or its `text_projection` from a
    Linear weight (`transpose`). Shapes are known without reading; tensors are computed when read."""

    def __init__(self, inner: TensorSource, recipes: Mapping[str, tuple[str, tuple[str, ...]]]) -> None:
        """`recipes` maps each new name to (op, inner names); op is `same`, `cat` (along dim 0) or `transpose`."""
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
        return self.inner.get(names[0])

    def release(self, keys: Iterable[str]) -> None:
        self.inner.release(name for key in keys for name in self.recipes[key][1])

    def close(self) -> None:
        self.inner.close()

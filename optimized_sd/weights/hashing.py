"""AUTOMATIC1111's model hashes, so our "Model hash:" matches what the webui and model sites show.

- `sha256_short`: the first 10 hex digits of the SHA-256 of the whole file (the webui's "shorthash",
  written as `Model hash:` in the parameters text since late 2022).
- `legacy_model_hash`: the webui's old 8-digit hash: SHA-256 of the 0x10000 bytes at offset
  0x100000 (fewer, or none, when the file is shorter).

Full-file hashing of a 4 GB checkpoint takes seconds (a 12 GB Z-Image transformer 9.7 s here, every run), so
`sha256_file` can keep results in a small JSON cache keyed by resolved path and checked against (size,
mtime_ns); `model_hash`, what the metadata writers call, always uses one (`hash_cache_path`), as the webui
keeps its `cache.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from optimized_sd.errors import CheckpointError
from optimized_sd.weights.sources import open_regular_file

__all__ = ["addnet_hash", "cached_model_hash", "extra_network_hash", "hash_cache_path", "legacy_model_hash", "sha256_file", "sha256_short"]

_CHUNK = 1 << 20
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def _stat(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; model hashes are defined for single files")
    return st


def sha256_file(path: Path, *, cache_path: Path | None = None) -> str:
    """Hex SHA-256 of the whole file, read in 1 MiB chunks; reused from `cache_path` when size and mtime match."""
    path = Path(path)
    st = _stat(path)
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    cache = _read_cache(cache_path) if cache_path is not None else {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]

    digest = hashlib.sha256()
    try:
        with open_regular_file(path) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    value = digest.hexdigest()

    if cache_path is not None:
        cache[key] = {"stamp": stamp, "sha256": value}
        _write_cache(cache_path, cache)
    return value


def sha256_short(path: Path, *, cache_path: Path | None = None) -> str:
    """A1111's shorthash: the first 10 hex digits of the file's SHA-256."""
    return sha256_file(path, cache_path=cache_path)[:10]


def hash_cache_path() -> Path:
    """Where model hashes are kept between runs: $OPTIMIZED_SD_HASH_CACHE, else
    $XDG_CACHE_HOME/optimized-sd/hashes.json (~/.cache by default)."""
    given = os.environ.get("OPTIMIZED_SD_HASH_CACHE")
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimized-sd" / "hashes.json"


def cached_model_hash(path: Path) -> str:
    """The `Model hash:` of a weight file, hashed once and then read from the cache while the file is unchanged."""
    return sha256_short(path, cache_path=hash_cache_path())


def addnet_hash(path: Path) -> str:
    """The "addnet" hash A1111 gives a .safetensors LoRA: SHA-256 of the bytes after the header, so
    editing the metadata does not change it."""
    path = Path(path)
    _stat(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            f.seek(8 + header_length)
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return digest.hexdigest()


def extra_network_hash(path: Path, *, lora: bool) -> str:
    """The 12-digit hash A1111 writes as `Lora hashes` (addnet hash for .safetensors LoRAs, else the
    file's SHA-256) and `TI hashes` (the file's SHA-256)."""
    path = Path(path)
    if lora and path.suffix == ".safetensors":
        return addnet_hash(path)[:12]
    return sha256_file(path)[:12]


def legacy_model_hash(path: Path) -> str:
    """A1111's old model hash: first 8 hex digits of SHA-256 over 64 KiB read at offset 1 MiB."""
    path = Path(path)
    _stat(path)
    try:
        with open_regular_file(path) as f:
            f.seek(_LEGACY_OFFSET)
            block = f.read(_LEGACY_LENGTH)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return hashlib.sha256(block).hexdigest()[:8]


def _read_cache(cache_path: Path) -> dict:
    """The cache's entries; a missing or damaged cache reads as empty (it is only a cache)."""
    try:
        data = json.loads(Path(cache_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache_path: Path, cache: dict) -> None:
    """Write atomically (temp file + rename); failure to write is ignored, as for any cache."""
    cache_path = Path(cache_path)
    tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache_path)
    except OSError:
        tmp.unlink(missing_ok=True)

"""Read PyTorch `.ckpt` files (CompVis/Lightning and bare state dicts) without running their pickles.

Real SD 1.x checkpoints (sd-v1-4.ckpt, v1-5-pruned*.ckpt) are Lightning files whose pickle names
`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` and numpy scalars, so
`torch.load(weights_only=True)` refuses them, and `weights_only=False` would run whatever the pickle
asks for. We keep torch's zip and storage handling (memory-mapped) and hand it a pickle module whose
`Unpickler.find_class` resolves only an allow-list of globals: tensor/storage rebuild helpers,
dtypes, a few containers, numpy scalars, and Lightning classes mapped to an inert placeholder.
Anything else stops the load before the global is ever called.
"""

from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from optimized_sd.errors import CheckpointError

__all__ = [
    "InertLightningObject",
    "load_ckpt",
    "state_dict_from_ckpt",
]

# Module prefixes whose classes become inert placeholders (never imported).
_LIGHTNING_MODULE_PREFIXES = (
    "pytorch_lightning.callbacks",
    "lightning.pytorch.callbacks",
)
# Lightning's hyper-parameter dict (a dict subclass) under its various homes.
_LIGHTNING_ATTRIBUTE_DICTS = frozenset(
    {
        ("pytorch_lightning.utilities.parsing", "AttributeDict"),
        ("lightning.pytorch.utilities.parsing", "AttributeDict"),
        ("lightning_fabric.utilities.data", "AttributeDict"),
        ("lightning.fabric.utilities.data", "AttributeDict"),
    }
)

_TORCH_UTILS_REBUILDERS = frozenset(
    {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    }
)

_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice}

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class InertLightningObject(dict):
    """Stand-in for a pickled Lightning object (callbacks, hyper-parameters); holds data, runs nothing.

    Subclasses are made per pickled global so `type(obj).lightning_global` says what the file named.
    It is a dict so dict-like pickles (AttributeDict) fill it; object state lands in `pickled_state`.
    """

    lightning_global = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.pickled_args = args

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state

    def __repr__(self) -> str:
        return f"<inert {self.lightning_global}>"


_placeholder_cache: dict[str, type[InertLightningObject]] = {}


def _placeholder(module: str, name: str) -> type[InertLightningObject]:
    """The placeholder class for one Lightning global (cached so repeated globals share a class)."""
    qualified = f"{module}.{name}"
    cls = _placeholder_cache.get(qualified)
    if cls is None:
        cls = type(name, (InertLightningObject,), {"lightning_global": qualified})
        _placeholder_cache[qualified] = cls
    return cls


def _numpy_global(module: str, name: str) -> Any | None:
    """numpy scalars/dtypes under numpy 1 (`numpy.core`) or numpy 2 (`numpy._core`) names, else None."""
    if (module, name) == ("numpy", "dtype"):
        np = importlib.import_module("numpy")
        return np.dtype
    if name == "scalar" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        # Resolve through the module the installed numpy really has; avoids numpy 2's
        # deprecated `numpy.core` shim.
        for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
            try:
                return importlib.import_module(candidate).scalar
            except (ImportError, AttributeError):
                continue
    return None


def _allowed_global(module: str, name: str) -> Any | None:
    """The object a pickle may refer to as `module.name`, or None when it is not allowed."""
    if module == "torch._utils" and name in _TORCH_UTILS_REBUILDERS:
        return getattr(torch._utils, name)
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return torch._tensor._rebuild_from_type_v2
    if module == "torch":
        # Look in the namespace only: getattr(torch, ...) could trigger torch's lazy submodule imports.
        obj = vars(torch).get(name)
        if isinstance(obj, torch.dtype):
            return obj
        if name in ("Size", "Tensor", "UntypedStorage", "device"):
            return obj
        if name.endswith("Storage"):
            try:  # the legacy format's storage records name `torch.FloatStorage` etc.
                return torch.serialization.StorageType(name)
            except KeyError:
                return None
        return None
    if (module, name) in (("torch._tensor", "Tensor"), ("torch.nn.parameter", "Parameter")):
        return torch.Tensor if name == "Tensor" else torch.nn.Parameter
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return torch.UntypedStorage
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict
    if module in ("builtins", "__builtin__") and name in _BUILTINS:
        return _BUILTINS[name]
    if (module, name) == ("_codecs", "encode"):
        # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); it only encodes text.
        import _codecs

        return _codecs.encode
    if module.startswith("numpy"):
        return _numpy_global(module, name)
    if any(module == p or module.startswith(p + ".") for p in _LIGHTNING_MODULE_PREFIXES):
        return _placeholder(module, name)
    if (module, name) in _LIGHTNING_ATTRIBUTE_DICTS:
        return _placeholder(module, name)
    return None


def _restricted_pickle_module(path: Path, storage_sizes: dict[str, int]) -> type:
    """A stand-in for the `pickle` module, as `torch.load(pickle_module=...)` uses it.

    torch subclasses `.Unpickler` (its `find_class` defers to ours for all but storage names, which
    it maps to its own inert `StorageType`), sets `persistent_load` on the instance, and calls
    `.load` for the legacy format's header records. `storage_sizes` collects, per zip record key,
    the bytes each storage claims, so the caller can check them against the zip records.
    """

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            obj = _allowed_global(module, name)
            if obj is None:
                raise CheckpointError(
                    f"{path}: refused to load: its pickle asks for the global '{module}.{name}', "
                    "which is not a tensor, storage, dtype or known Lightning class; "
                    "nothing in the file was run"
                )
            return obj

        def __setattr__(self, attr: str, value: Any) -> None:
            if attr == "persistent_load" and callable(value):
                value = _recording_persistent_load(value, storage_sizes)
            super().__setattr__(attr, value)

    def restricted_load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    class RestrictedPickle:
        Unpickler = RestrictedUnpickler
        load = staticmethod(restricted_load)
        UnpicklingError = pickle.UnpicklingError

    return RestrictedPickle


def _recording_persistent_load(
    inner: Callable[[Any], Any], storage_sizes: dict[str, int]
) -> Callable[[Any], Any]:
    """Wrap torch's persistent_load to note how many bytes each zip storage record must hold."""

    def persistent_load(saved_id: Any) -> Any:
        storage = inner(saved_id)
        # zip format: ("storage", storage_type, key, location, numel)
        if isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage":
            key = str(saved_id[2])
            nbytes = getattr(storage, "_untyped_storage", storage).nbytes()
            storage_sizes[key] = max(storage_sizes.get(key, 0), int(nbytes))
        return storage

    return persistent_load


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _read_head(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a folder, not a checkpoint file (a diffusers folder needs the diffusers reader)"
        )
    try:
        with path.open("rb") as f:
            return f.read(512)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({_one_line(exc)})") from None


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """True when a file of `size` bytes starts (`head`, 9 bytes or more) with a safetensors header:
    an 8-byte little-endian length that fits the file, then JSON."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _zip_records(path: Path) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """Check a zip is a torch.save archive; return its folder prefix and its records by name."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt zip checkpoint (cannot read its zip directory: "
            f"{_one_line(exc)}); was the download cut short?"
        ) from None
    pickles = [name for name in infos if name == "data.pkl" or name.endswith("/data.pkl")]
    if any(name.endswith("constants.pkl") for name in infos):
        raise CheckpointError(
            f"{path}: is a TorchScript archive, not a weights checkpoint; refused (loading it runs code)"
        )
    if len(pickles) != 1:
        shown = ", ".join(sorted(infos)[:5]) or "nothing"
        raise CheckpointError(
            f"{path}: is a zip archive but not a PyTorch checkpoint (no single data.pkl; holds {shown})"
        )
    prefix = pickles[0][: -len("data.pkl")]
    for name, info in infos.items():
        if name.startswith(prefix + "data/") and info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: is a compressed zip; torch.save writes tensors uncompressed, so this is "
                "not a PyTorch checkpoint as saved"
            )
    return prefix, infos


def load_ckpt(path: Path) -> dict[str, Any]:
    """The top-level object of a PyTorch checkpoint, unpickled through an allow-list (memory-mapped zips).

    Raises CheckpointError (one line) for a missing, unreadable, truncated, non-torch or unsafe file.
    """
    path = Path(path)
    head = _read_head(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file")
    storage_sizes: dict[str, int] = {}
    pickle_module = _restricted_pickle_module(path, storage_sizes)

    if head.startswith(_ZIP_MAGIC):
        prefix, infos = _zip_records(path)
        if path.name.endswith(".safetensors"):
            # torch.load would hand any path named *.safetensors to safetensors itself.
            raise CheckpointError(
                f"{path}: is a PyTorch zip checkpoint named .safetensors; rename it to .ckpt"
            )
        obj = _torch_load(path, pickle_module, mmap=True)
        for key, nbytes in storage_sizes.items():
            info = infos.get(f"{prefix}data/{key}")
            if info is None or info.file_size < nbytes:
                have = "missing" if info is None else f"{info.file_size} bytes"
                raise CheckpointError(
                    f"{path}: truncated checkpoint: tensor record data/{key} needs {nbytes} bytes, "
                    f"the file holds {have}"
                )
    elif looks_like_safetensors(head, size):
        raise CheckpointError(
            f"{path}: is a .safetensors file, not a pickled checkpoint; read it with safetensors"
        )
    elif head[:1] == b"\x80" or head[257:262] == b"ustar":
        # torch < 1.6 format: a sequence of pickles (or a tar), read into memory; no mmap.
        obj = _torch_load(path, pickle_module, mmap=False)
    else:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (unrecognised header {head[:8]!r})"
        )
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors"
        )
    return obj


def _torch_load(path: Path, pickle_module: type, *, mmap: bool) -> Any:
    try:
        return torch.load(
            str(path),
            map_location="cpu",
            pickle_module=pickle_module,
            weights_only=False,  # safe: every global goes through RestrictedUnpickler.find_class
            mmap=mmap,
        )
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({_one_line(exc)})"
        ) from None
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, OSError,
            IndexError, AssertionError, io.UnsupportedOperation) as exc:
        raise CheckpointError(
            f"{path}: unreadable PyTorch checkpoint ({type(exc).__name__}: {_one_line(exc)})"
        ) from None


def state_dict_from_ckpt(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint object: unwraps `state_dict`, keeps tensors, turns numpy scalars into tensors.

    Non-tensor entries (ints, strings, placeholders) are dropped; an empty result is an error.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    inner = obj.get("state_dict", obj)
    if not isinstance(inner, dict):
        raise CheckpointError(
            f"checkpoint's 'state_dict' is a {type(inner).__name__}, not a dict of tensors"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in inner.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint has a non-string key {key!r}; not a state dict")
        tensor = _as_tensor(value)
        if tensor is not None:
            out[key] = tensor
    if not out:
        keys = ", ".join(map(str, list(inner)[:8])) or "none"
        raise CheckpointError(f"checkpoint holds no tensors (top-level keys: {keys})")
    return out


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        # Parameters become plain tensors sharing the same (mapped) storage.
        return value.detach() if isinstance(value, torch.nn.Parameter) else value
    module = type(value).__module__ or ""
    if module.startswith("numpy"):
        np = importlib.import_module("numpy")
        if isinstance(value, np.generic) and value.dtype.kind in "biuf":
            return torch.from_numpy(np.asarray(value).copy())
    return None

"""Read PyTorch `.ckpt` files (CompVis/Lightning and bare state dicts) without running their pickles.

Real SD 1.x checkpoints (sd-v1-4.ckpt, v1-5-pruned*.ckpt) are Lightning files whose pickle names
`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` and numpy scalars, so
`torch.load(weights_only=True)` refuses them, and `weights_only=False` trusts the pickle (its legacy
path even acts on persistent ids the allow-list never sees). So no pickle from a file ever reaches
`torch.load` or the C unpickler: this module reads both torch formats itself.

- zip format (torch >= 1.6, every SD `.ckpt`): `archive/data.pkl` (size-checked from the zip directory
  before it is read) is run through `_InertUnpickler`; each storage is its uncompressed zip record,
  memory-mapped copy-on-write (zero copy), and tensors are views built by `_tensor_view` after checking
  offset, size and stride against the storage's bounds.
- legacy format (torch < 1.6): a sequence of pickles then raw storages; the same unpickler, with the
  storages' file offsets found from the record headers (documented by torch/serialization.py `_legacy_save`).
- tar format (torch < 0.4): refused.

`_InertUnpickler` is the stdlib's pure-Python unpickler with every opcode that calls or mutates routed
through checks: globals resolve only to an allow-list of inert stand-ins (dtypes, our rebuild functions,
Lightning placeholders, a ParameterDict stand-in), calls take checked arguments, `BUILD` only fills our
placeholders (a state_dict's `_metadata` is dropped), and `SETITEM(S)`/`APPEND(S)`/`ADDITEMS` only fill
plain containers. Loading cannot change any class or function. Containers and MARKs nest at most
PICKLE_LIMIT_NESTING deep, dict keys and set items are flat (their hash never recurses), and a tensor view
may neither hold more elements than its storage nor alias them.
"""

from __future__ import annotations

import importlib
import io
import math
import mmap
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optimized_sd.errors import CheckpointError
from optimized_sd.weights.gguf import MAGIC as GGUF_MAGIC
from optimized_sd.weights.sources import MAX_TENSOR_DIMS, open_regular_file

__all__ = [
    "PICKLE_LIMIT_BYTES",
    "PICKLE_LIMIT_NESTING",
    "PICKLE_LIMIT_OPCODES",
    "InertLightningObject",
    "InertParameterDict",
    "load_ckpt",
    "looks_like_safetensors",
    "state_dict_from_ckpt",
]

# A checkpoint's pickle only describes tensors (their bytes live elsewhere): SD's is ~100-300 KB. These bound
# what a small file can make us allocate: 64 MiB of pickle, 4 million opcodes (each creates at most one object).
PICKLE_LIMIT_BYTES = 64 * 2**20
PICKLE_LIMIT_OPCODES = 4_000_000
# CPython hashes nested tuples recursively in C, without a depth check: a 1 MB pickle of a tuple nested 10**6
# deep, used as a dict key, overflows the C stack. Containers (and MARKs) nest at most this deep; SD's nest < 10.
PICKLE_LIMIT_NESTING = 200

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

# torch's typed-storage names (what the pickle names as a persistent id's storage type) -> element dtype.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001

_LEGACY_ADVICE = "re-save it with a current torch (torch.save) or convert it to .safetensors"


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


class InertParameterDict(dict):
    """Stand-in for a pickled `torch.nn.ParameterDict` (original textual-inversion files' `string_to_param`):
    its tensors by name. NEWOBJ makes an empty one and BUILD keeps the tensors of the module state's
    `_parameters`; the rest of the state (hooks, flags) is dropped, and no module code runs."""

    def set_state(self, state: Any) -> None:
        parameters = state.get("_parameters") if type(state) is dict else None
        if not (type(parameters) in (dict, OrderedDict)
                and all(type(k) is str and isinstance(v, torch.Tensor) for k, v in parameters.items())):
            raise _Refused("sets a torch.nn.ParameterDict state without a _parameters dict of named tensors")
        self.update(parameters)


class _Refused(Exception):
    """Raised inside the unpickler; `load_ckpt` turns it into a CheckpointError naming the file."""


# --- stand-ins for the globals a checkpoint may name ----------------------------------------------


@dataclass(frozen=True)
class _Marker:
    """A global that is only ever a value (a storage type, `torch.Tensor` as a rebuild's target type)."""

    qualified: str
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class _Allowed:
    """A global the pickle may call: `check_and_call` validates the arguments before anything is built."""

    qualified: str
    check_and_call: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.check_and_call(*args)


@dataclass
class _Storage:
    """One storage: `raw` is its bytes (a uint8 view of the mapped file, or a `meta` tensor while the legacy
    format's offsets are not yet known) and `dtype` the element type the file declared."""

    key: str
    dtype: torch.dtype
    raw: torch.Tensor


def _is_index(value: Any) -> bool:
    return type(value) is int and value >= 0


def _tensor_view(storage: Any, dtype: torch.dtype, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    """The tensor `storage[offset]` with `size` and `stride`, in `dtype`, after checking it lies in the storage."""
    if not isinstance(storage, _Storage):
        raise _Refused(f"rebuilds a tensor from a {type(storage).__name__}, not a storage record")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= MAX_TENSOR_DIMS):
        raise _Refused(f"rebuilds a tensor with size {str(size)[:60]} and stride {str(stride)[:60]}")
    if not (_is_index(offset) and all(map(_is_index, size)) and all(map(_is_index, stride))):
        raise _Refused(f"rebuilds a tensor with a negative or non-integer offset, size or stride ({str(size)[:60]})")
    if storage.raw.numel() % dtype.itemsize:
        raise _Refused(f"views storage {storage.key} ({storage.raw.numel()} bytes) as {dtype}")
    numel = storage.raw.numel() // dtype.itemsize
    count = math.prod(size)
    if count > numel - offset:  # a 641-byte file must not become a view that copies into terabytes
        raise _Refused(
            f"rebuilds a tensor of {count:,} elements from storage {storage.key}, which holds {max(0, numel - offset):,} "
            f"from offset {offset}"
        )
    if _overlapping(size, stride):
        raise _Refused(
            f"rebuilds a tensor of size {tuple(size)} with stride {tuple(stride)}, whose elements overlap "
            "(a stride of 0, or one inside the span of a smaller stride)"
        )
    if count == 0:
        last = offset - 1  # an empty tensor touches nothing; its offset may sit at the end
    else:
        last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    if last >= numel:
        raise _Refused(
            f"rebuilds a tensor of size {tuple(size)} reaching element {last} of storage {storage.key}, which holds {numel}"
        )
    flat = storage.raw.view(dtype) if storage.raw.numel() else torch.empty(0, dtype=dtype, device=storage.raw.device)
    return flat.as_strided(size, stride, offset)


def _overlapping(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True when two elements of the view share a storage element. Walking the dims of size > 1 by increasing
    stride, each stride must step past all the smaller ones reach (what every view torch saves does; an
    expanded dim has stride 0)."""
    reach = 0
    for step, length in sorted((st, s) for s, st in zip(size, stride, strict=True) if s > 1):
        if step <= reach:
            return True
        reach += (length - 1) * step
    return False


def _no_hooks(hooks: Any, what: str = "backward hooks") -> None:
    if not (isinstance(hooks, dict) and not hooks) and hooks is not None:
        raise _Refused(f"attaches {what} to a tensor")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _tensor_view(storage, getattr(storage, "dtype", torch.uint8), offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    _no_hooks(backward_hooks)
    _no_hooks(metadata, "metadata")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
                       dtype: Any, metadata: Any = None) -> torch.Tensor:
    _no_hooks(backward_hooks)
    _no_hooks(metadata, "metadata")
    if not isinstance(dtype, torch.dtype):
        raise _Refused(f"rebuilds a tensor with dtype {type(dtype).__name__}")
    return _tensor_view(storage, dtype, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> torch.Tensor:
    """A Parameter around an already rebuilt tensor; `state` (attributes torch would set on it) is dropped."""
    _no_hooks(backward_hooks)
    if not isinstance(data, torch.Tensor) or not (state is None or isinstance(state, (dict, tuple))):
        raise _Refused(f"rebuilds a parameter from a {type(data).__name__}")
    return torch.nn.Parameter(data, requires_grad=False)


_TENSOR_REBUILDERS = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}
_TENSOR_TYPES = {"torch.Tensor": _Marker("torch.Tensor"), "torch.nn.Parameter": _Marker("torch.nn.Parameter")}


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
    """torch's wrapper for tensors with Python state: only our rebuilders, only to Tensor/Parameter, state dropped."""
    if not (isinstance(func, _Allowed) and func.check_and_call in _TENSOR_REBUILDERS.values()):
        raise _Refused(f"rebuilds a tensor through {_describe(func)}")
    if new_type not in _TENSOR_TYPES.values() or not isinstance(args, tuple):
        raise _Refused(f"rebuilds a tensor as {_describe(new_type)}")
    tensor = func(*args)
    return tensor if new_type.qualified == "torch.Tensor" else torch.nn.Parameter(tensor, requires_grad=False)


def _torch_size(dims: Any = ()) -> torch.Size:
    if not (isinstance(dims, (tuple, list)) and len(dims) <= MAX_TENSOR_DIMS and all(map(_is_index, dims))):
        raise _Refused(f"builds torch.Size({str(dims)[:60]})")
    return torch.Size(dims)


def _torch_device(kind: Any, index: Any = None) -> torch.device:
    if not (isinstance(kind, str) and len(kind) <= 32 and (index is None or _is_index(index))):
        raise _Refused("builds a torch.device from something other than a short name")
    try:
        return torch.device(kind) if index is None else torch.device(kind, index)
    except (RuntimeError, ValueError):
        raise _Refused(f"names the device {kind[:32]!r}") from None


def _ordered_dict(*args: Any) -> OrderedDict:
    if args not in ((), ([],)):
        raise _Refused("builds an OrderedDict with arguments")
    return OrderedDict()


# What a dict key or set item may be: things whose hash never recurses (CPython hashes tuples recursively in C).
_FLAT_KEY_TYPES = frozenset({str, int, float, bool, bytes, type(None)})


def _check_keys(keys: Iterable[Any], what: str) -> None:
    for key in keys:
        if not (type(key) in _FLAT_KEY_TYPES or _is_placeholder_class(key) or isinstance(key, torch.dtype)):
            raise _Refused(f"uses a {type(key).__name__} as {what} (only strings, numbers and class names may be)")


def _hashable_items(items: Any) -> list[Any]:
    if not isinstance(items, (list, tuple)):
        raise _Refused(f"builds a set from a {type(items).__name__}")
    _check_keys(items, "a set item")
    return list(items)


def _parameter_dict(*args: Any) -> InertParameterDict:
    if args:
        raise _Refused("builds a torch.nn.ParameterDict with arguments")
    return InertParameterDict()


def _set(items: Any = ()) -> set:
    return set(_hashable_items(items))


def _frozenset(items: Any = ()) -> frozenset:
    return frozenset(_hashable_items(items))


def _slice(*args: Any) -> slice:
    if not (1 <= len(args) <= 3 and all(a is None or type(a) is int for a in args)):
        raise _Refused("builds a slice from something other than integers")
    return slice(*args)


def _codecs_encode(text: Any, encoding: Any = None) -> bytes:
    """Protocol-2 pickles spell bytes as `_codecs.encode(str, "latin1")`; nothing else (no codec lookup by name)."""
    if not (type(text) is str and encoding == "latin1"):
        raise _Refused(f"calls _codecs.encode with {type(text).__name__} and {str(encoding)[:20]!r}, not (str, 'latin1')")
    return text.encode("latin-1")


# numpy scalars (Lightning's epoch/global_step, scores): dtype codes we rebuild, by numpy's short name.
_NUMPY_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})


class _NumpyDtype:
    """`numpy.dtype(code, align, copy)` as the pickle builds it; `BUILD` gives its byte order. Becomes a real
    numpy dtype only inside `_numpy_scalar` (a pickle never touches numpy's shared dtype objects)."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if code not in _NUMPY_CODES or type(align) is not bool or type(copy) is not bool:
            raise _Refused(f"builds numpy.dtype({str(code)[:20]!r}), not a plain number type")
        self.code, self.byteorder = code, "="

    def set_state(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise _Refused("sets an unexpected state on a numpy dtype")
        if any(part not in (None, -1, 0) for part in state[2:]):
            raise _Refused("builds a structured or sub-array numpy dtype")
        self.byteorder = state[1]

    def numpy(self) -> Any:
        np = importlib.import_module("numpy")
        order = "=" if self.byteorder == "|" else self.byteorder
        return np.dtype(order + self.code)


def _numpy_scalar(dtype: Any, data: Any) -> Any:
    if not isinstance(dtype, _NumpyDtype) or type(data) is not bytes:
        raise _Refused("builds a numpy scalar from something other than a number type and its bytes")
    np_dtype = dtype.numpy()
    if len(data) != np_dtype.itemsize:
        raise _Refused(f"builds a {np_dtype} scalar from {len(data)} bytes")
    np = importlib.import_module("numpy")
    return np.frombuffer(data, dtype=np_dtype)[0].astype(np_dtype.newbyteorder("="))


def _allowed(qualified: str, fn: Callable[..., Any]) -> _Allowed:
    return _Allowed(qualified, fn)


_ALLOWED_CALLS: dict[tuple[str, str], _Allowed] = {
    **{("torch._utils", name): _allowed(f"torch._utils.{name}", fn) for name, fn in _TENSOR_REBUILDERS.items()},
    ("torch._tensor", "_rebuild_from_type_v2"): _allowed("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2),
    ("torch", "Size"): _allowed("torch.Size", _torch_size),
    ("torch", "device"): _allowed("torch.device", _torch_device),
    ("collections", "OrderedDict"): _allowed("collections.OrderedDict", _ordered_dict),
    ("torch.nn.modules.container", "ParameterDict"): _allowed("torch.nn.ParameterDict", _parameter_dict),
    ("_codecs", "encode"): _allowed("_codecs.encode", _codecs_encode),
    ("numpy", "dtype"): _allowed("numpy.dtype", _NumpyDtype),
    ("numpy.core.multiarray", "scalar"): _allowed("numpy.core.multiarray.scalar", _numpy_scalar),
    ("numpy._core.multiarray", "scalar"): _allowed("numpy._core.multiarray.scalar", _numpy_scalar),
    **{(module, "set"): _allowed("set", _set) for module in ("builtins", "__builtin__")},
    **{(module, "frozenset"): _allowed("frozenset", _frozenset) for module in ("builtins", "__builtin__")},
    **{(module, "slice"): _allowed("slice", _slice) for module in ("builtins", "__builtin__")},
}
_TENSOR_TYPE_GLOBALS = {
    ("torch", "Tensor"): "torch.Tensor",
    ("torch._tensor", "Tensor"): "torch.Tensor",
    ("torch.nn.parameter", "Parameter"): "torch.nn.Parameter",
}
_STORAGE_MARKERS = {name: _Marker(f"torch.{name}", dtype) for name, dtype in _STORAGE_DTYPES.items()}


def _allowed_global(module: str, name: str) -> Any | None:
    """The inert stand-in a pickle gets for `module.name`, or None when the global is not allowed."""
    if (module, name) in _ALLOWED_CALLS:
        return _ALLOWED_CALLS[(module, name)]
    if (module, name) in _TENSOR_TYPE_GLOBALS:
        return _TENSOR_TYPES[_TENSOR_TYPE_GLOBALS[(module, name)]]
    if module in ("torch", "torch.storage") and name in _STORAGE_MARKERS:
        return _STORAGE_MARKERS[name]
    if module == "torch":
        # Look in the namespace only: getattr(torch, ...) could trigger torch's lazy submodule imports.
        obj = vars(torch).get(name)
        return obj if isinstance(obj, torch.dtype) else None
    if any(module == p or module.startswith(p + ".") for p in _LIGHTNING_MODULE_PREFIXES):
        return _placeholder(module, name)
    if (module, name) in _LIGHTNING_ATTRIBUTE_DICTS:
        return _placeholder(module, name)
    return None


def _describe(obj: Any) -> str:
    if isinstance(obj, (_Allowed, _Marker)):
        return obj.qualified
    if isinstance(obj, type) and issubclass(obj, InertLightningObject):
        return f"the class {obj.lightning_global}"
    return f"a {type(obj).__name__}"


def _is_placeholder_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, InertLightningObject)


# --- the unpickler -------------------------------------------------------------------------------

_CONTAINERS = (tuple, list, dict, set, frozenset)
_MUTABLE_CONTAINERS = (list, dict, set)  # OrderedDict and the placeholders are dicts


class _Nesting:
    """How deep the containers of one pickle nest, checked as each is built or filled: a container of items
    nested d deep is nested d + 1 deep, so nothing deeper than PICKLE_LIMIT_NESTING ever exists.

    Entries (depth, placed, container) exist only for containers deeper than 1 or placed in another (any other
    container is 1 deep); they keep their container alive, so an id in the table is never reused (entries
    only the table holds are swept). A container placed in another is never filled again: that would deepen
    its holders behind their backs, and only a cycle or a hand-built chain does it (pickle fills a container
    before its holder takes it)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[int, bool, Any]] = {}
        self._sweep_at = 2**16

    def depth(self, obj: Any) -> int:
        entry = self._known.get(id(obj))
        if entry is not None:
            return entry[0]
        return 1 if isinstance(obj, _CONTAINERS) else 0

    def built(self, container: Any, items: Iterable[Any]) -> Any:
        """Record that `container` was built from, or filled with, `items`; return it."""
        entry = self._known.get(id(container))
        if entry is not None and entry[1]:
            raise _Refused("fills a container after placing it in another (a cycle or a hand-built chain)")
        depth = entry[0] if entry is not None else 1
        for item in items:
            if not isinstance(item, _CONTAINERS):
                continue
            if item is container:
                raise _Refused("places a container inside itself")
            item_depth = self.depth(item)
            depth = max(depth, item_depth + 1)
            if isinstance(item, _MUTABLE_CONTAINERS):
                self._known[id(item)] = (item_depth, True, item)
        if depth > PICKLE_LIMIT_NESTING:
            raise _Refused(f"nests too deeply (containers more than {PICKLE_LIMIT_NESTING} levels deep)")
        if depth > 1:
            self._known[id(container)] = (depth, False, container)
        if len(self._known) > self._sweep_at:
            self._sweep()
        return container

    def _sweep(self) -> None:
        """Forget containers only the table still holds (newest first, so a holder goes before what it holds)."""
        for key in reversed(list(self._known)):
            if sys.getrefcount(self._known[key][2]) <= 2:  # the entry's reference and the argument's
                del self._known[key]
        self._sweep_at = max(2**16, 2 * len(self._known))


class _InertUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler with every calling or mutating opcode checked (see the module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, window: _Window, persistent_load: Callable[[Any], Any]) -> None:
        super().__init__(window, encoding="utf-8")  # torch.load's encoding for Python 2 strings
        self._persistent = persistent_load
        self._opcodes = 0
        self._nesting = _Nesting()

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name) if isinstance(module, str) and isinstance(name, str) else None
        if obj is None:
            raise _Refused(
                f"asks for the global '{module}.{name}', which is not a tensor, storage, dtype or known Lightning class"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent(pid)

    def _call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        if not isinstance(args, tuple) or kwargs:
            raise _Refused(f"calls {_describe(func)} with {type(args).__name__} arguments")
        if isinstance(func, _Allowed):
            try:
                return func(*args)
            except TypeError:  # wrong number of arguments
                raise _Refused(f"calls {func.qualified} with {len(args)} arguments") from None
        if _is_placeholder_class(func):
            return self._nesting.built(func(*args), [args])  # it keeps its arguments
        raise _Refused(f"calls {_describe(func)}, which it may not call")

    # opcodes that nest: MARK and those that build containers from the stack
    def _load_mark(self) -> None:
        if len(self.metastack) >= PICKLE_LIMIT_NESTING:
            raise _Refused(f"nests too deeply (MARKs more than {PICKLE_LIMIT_NESTING} levels deep)")
        pickle._Unpickler.load_mark(self)  # type: ignore[attr-defined]

    def _load_tuple(self) -> None:
        items = self.pop_mark()
        self.append(self._nesting.built(tuple(items), items))

    def _load_small_tuple(self, length: int) -> None:
        items = tuple(self.stack[-length:]) if length <= len(self.stack) else ()
        if len(items) != length:
            raise _Refused(f"builds a {length}-tuple from a stack of {len(self.stack)}")
        self.stack[-length:] = [self._nesting.built(items, items)]

    def _load_list(self) -> None:
        items = self.pop_mark()
        self.append(self._nesting.built(items, items))

    def _load_dict(self) -> None:
        items = self.pop_mark()
        self.append(self._fill_dict({}, items))

    def _load_frozenset(self) -> None:
        items = self.pop_mark()
        _check_keys(items, "a set item")
        self.append(self._nesting.built(frozenset(items), items))

    # opcodes that call: REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ
    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, kwargs))

    def _load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        self.append(self._call(self.find_class(module, name), tuple(self.pop_mark())))

    def _load_obj(self) -> None:
        args = self.pop_mark()
        if not args:
            raise _Refused("uses OBJ without a class")
        self.append(self._call(args[0], tuple(args[1:])))

    def _load_ext(self) -> None:
        raise _Refused("uses the copyreg extension registry")

    # opcodes that mutate: BUILD, APPEND(S), SETITEM(S), ADDITEMS
    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, InertLightningObject):
            self._nesting.built(inst, [state])
            inst.pickled_state = state
        elif isinstance(inst, InertParameterDict):
            inst.set_state(state)
        elif isinstance(inst, _NumpyDtype):
            inst.set_state(state)
        elif type(inst) is OrderedDict and type(state) is dict:
            pass  # what Module.state_dict() returns keeps `_metadata` (module versions) as an attribute: dropped
        else:
            raise _Refused(f"sets state (BUILD) on {_describe(inst)}")

    def _target(self, allowed: tuple[type, ...], what: str, index: int = -1) -> Any:
        target = self.stack[index]
        if type(target) not in allowed and not (dict in allowed and isinstance(target, InertLightningObject)):
            raise _Refused(f"{what} {_describe(target)}")
        return target

    def _load_append(self) -> None:
        value = self.stack.pop()
        self._nesting.built(self._target((list,), "appends to"), [value]).append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        self._nesting.built(self._target((list,), "appends to"), items).extend(items)

    def _fill_dict(self, target: dict, items: list[Any]) -> dict:
        """Set `items` (key, value, key, value, ...) on a dict after checking its keys and how deep it nests."""
        keys = items[0 : len(items) - 1 : 2]
        _check_keys(keys, "a dict key")
        self._nesting.built(target, items[1::2])
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]
        return target

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._fill_dict(self._target((dict, OrderedDict), "sets items on"), [key, value])

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        self._fill_dict(self._target((dict, OrderedDict), "sets items on"), items)

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target((set,), "adds items to")
        _check_keys(items, "a set item")
        target.update(items)


def _counted(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    def run(self: _InertUnpickler) -> None:
        self._opcodes += 1
        if self._opcodes > PICKLE_LIMIT_OPCODES:
            raise _Refused(f"runs past {PICKLE_LIMIT_OPCODES:,} opcodes (a weights pickle needs far fewer)")
        handler(self)

    return run


for _opcode, _handler in {
    pickle.REDUCE: _InertUnpickler._load_reduce,
    pickle.NEWOBJ: _InertUnpickler._load_newobj,
    pickle.NEWOBJ_EX: _InertUnpickler._load_newobj_ex,
    pickle.INST: _InertUnpickler._load_inst,
    pickle.OBJ: _InertUnpickler._load_obj,
    pickle.EXT1: _InertUnpickler._load_ext,
    pickle.EXT2: _InertUnpickler._load_ext,
    pickle.EXT4: _InertUnpickler._load_ext,
    pickle.BUILD: _InertUnpickler._load_build,
    pickle.APPEND: _InertUnpickler._load_append,
    pickle.APPENDS: _InertUnpickler._load_appends,
    pickle.SETITEM: _InertUnpickler._load_setitem,
    pickle.SETITEMS: _InertUnpickler._load_setitems,
    pickle.ADDITEMS: _InertUnpickler._load_additems,
    pickle.MARK: _InertUnpickler._load_mark,
    pickle.TUPLE: _InertUnpickler._load_tuple,
    pickle.TUPLE1: lambda self: self._load_small_tuple(1),
    pickle.TUPLE2: lambda self: self._load_small_tuple(2),
    pickle.TUPLE3: lambda self: self._load_small_tuple(3),
    pickle.LIST: _InertUnpickler._load_list,
    pickle.DICT: _InertUnpickler._load_dict,
    pickle.FROZENSET: _InertUnpickler._load_frozenset,
}.items():
    _InertUnpickler.dispatch[_opcode[0]] = _handler
_InertUnpickler.dispatch = {code: _counted(handler) for code, handler in _InertUnpickler.dispatch.items()}


class _Window:
    """A file-like view of `buffer[position:stop]` (bytes or the mapped file) for one pickle; never reads past `stop`."""

    def __init__(self, buffer: bytes | mmap.mmap, position: int, stop: int) -> None:
        self.buffer, self.position, self.stop = buffer, position, min(stop, len(buffer))

    def read(self, n: int = -1) -> bytes:
        end = self.stop if n < 0 else min(self.stop, self.position + n)
        data = self.buffer[self.position : end]
        self.position = max(self.position, end)
        return data

    def readline(self) -> bytes:
        newline = self.buffer.find(b"\n", self.position, self.stop)
        return self.read(self.stop - self.position if newline < 0 else newline + 1 - self.position)


def _unpickle(path: Path, window: _Window, persistent_load: Callable[[Any], Any]) -> Any:
    """Run one pickle through `_InertUnpickler`; every failure becomes a one-line CheckpointError."""
    try:
        return _InertUnpickler(window, persistent_load).load()
    except _Refused as refused:
        raise CheckpointError(f"{path}: refused to load: its pickle {refused}; nothing in the file was run") from None
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt checkpoint (its pickle nests too deeply)") from None
    except MemoryError:
        raise CheckpointError(f"{path}: corrupt checkpoint (its pickle asks for more memory than there is)") from None
    except EOFError:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint (its pickle ends early)") from None
    except Exception as exc:  # noqa: BLE001 - a malformed pickle raises anything; it is the file's fault
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _storage_id(path: Path, pid: Any, length: int) -> tuple[torch.dtype, str, int, Any]:
    """Check a persistent id `('storage', storage_type, key, location, numel[, view])`; return dtype, key, numel, view."""
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"):
        kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
        raise _Refused(f"uses the persistent id {str(kind)[:40]!r}, not a storage record")
    storage_type, key, _location, numel = pid[1:5]
    if not (isinstance(storage_type, _Marker) and storage_type.dtype is not None):
        raise _Refused(f"names {_describe(storage_type)} as a storage type")
    if not (isinstance(key, str) and len(key) <= 64 and _is_index(numel)):
        raise _Refused("names a storage by something other than a short key and a size")
    return storage_type.dtype, key, numel, pid[5] if length == 6 else None


# --- zip format ----------------------------------------------------------------------------------


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """True when a file of `size` bytes starts (`head`, 9 bytes or more) with a safetensors header:
    an 8-byte little-endian length that fits the file, then JSON."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _zip_directory(path: Path, handle: Any) -> tuple[zipfile.ZipFile, str, dict[str, zipfile.ZipInfo]]:
    """Check a zip is a torch.save archive; return it, its folder prefix and its records by name."""
    try:
        archive = zipfile.ZipFile(handle)
        infos = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt zip checkpoint (cannot read its zip directory: "
            f"{_one_line(exc)}); was the download cut short?"
        ) from None
    pickles = [name for name in infos if name == "data.pkl" or name.endswith("/data.pkl")]
    if any(name.endswith("constants.pkl") for name in infos):
        raise CheckpointError(f"{path}: is a TorchScript archive, not a weights checkpoint; refused (loading it runs code)")
    if len(pickles) != 1:
        shown = ", ".join(sorted(infos)[:5]) or "nothing"
        raise CheckpointError(f"{path}: is a zip archive but not a PyTorch checkpoint (no single data.pkl; holds {shown})")
    return archive, pickles[0][: -len("data.pkl")], infos


def _read_small_record(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, what: str) -> bytes:
    """A record's bytes, refused from the zip directory when it would inflate past `limit` (never read first)."""
    if info.file_size > limit:
        raise CheckpointError(
            f"{path}: refused: its {what} ({info.filename}) would inflate to {info.file_size:,} bytes, past the "
            f"{limit // 2**20} MiB limit for a checkpoint's pickle"
        )
    try:
        with archive.open(info) as record:
            data = record.read(limit + 1)  # the directory may lie; never read more than the limit
    except Exception as exc:  # noqa: BLE001 - zipfile and its decompressors (zlib.error, LZMAError, ...): the file's fault
        raise CheckpointError(f"{path}: truncated or corrupt zip checkpoint ({info.filename}: {_one_line(exc)})") from None
    if len(data) > limit:
        raise CheckpointError(f"{path}: refused: its {what} inflates past the {limit // 2**20} MiB limit")
    return data


def _record_offset(path: Path, mapping: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) record's bytes start, read from its local header; checked against the file."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size or info.flag_bits & 0x1:
        raise CheckpointError(
            f"{path}: tensor record {info.filename} is compressed or encrypted; torch.save writes tensors uncompressed, "
            "so this is not a PyTorch checkpoint as saved"
        )
    start = info.header_offset
    if start + _ZIP_LOCAL_HEADER.size > len(mapping):
        raise CheckpointError(f"{path}: truncated checkpoint: the zip header of {info.filename} lies past the end of the file")
    signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack_from(mapping, start)
    if signature != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip checkpoint: no local header for {info.filename}")
    return start + _ZIP_LOCAL_HEADER.size + name_len + extra_len


def _load_zip(path: Path, handle: Any, mapping: mmap.mmap) -> Any:
    archive, prefix, infos = _zip_directory(path, handle)
    byteorder = infos.get(prefix + "byteorder")
    if byteorder is not None and _read_small_record(path, archive, byteorder, 16, "byte-order record") != b"little":
        raise CheckpointError(f"{path}: is a big-endian checkpoint; {_LEGACY_ADVICE} on a little-endian machine")
    data = _read_small_record(path, archive, infos[prefix + "data.pkl"], PICKLE_LIMIT_BYTES, "pickle")
    storages: dict[str, torch.Tensor] = {}

    def persistent_load(pid: Any) -> _Storage:
        dtype, key, numel, _ = _storage_id(path, pid, 5)
        raw = storages.get(key)
        if raw is None:
            info = infos.get(f"{prefix}data/{key}")
            nbytes = numel * dtype.itemsize
            if info is None or info.file_size < nbytes:
                have = "missing" if info is None else f"{info.file_size} bytes"
                raise CheckpointError(
                    f"{path}: truncated checkpoint: tensor record data/{key} needs {nbytes} bytes, the file holds {have}"
                )
            offset = _record_offset(path, mapping, info)
            if offset + info.file_size > len(mapping):
                raise CheckpointError(f"{path}: truncated checkpoint: tensor record data/{key} runs past the end of the file")
            raw = storages[key] = _mapped_bytes(mapping, offset, info.file_size)
        return _Storage(key, dtype, raw[: numel * dtype.itemsize])

    return _unpickle(path, _Window(data, 0, len(data)), persistent_load)


def _mapped_bytes(mapping: mmap.mmap, offset: int, nbytes: int) -> torch.Tensor:
    """`nbytes` of the mapped file from `offset` as a uint8 tensor sharing the mapping (zero copy)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)


# --- legacy format (torch < 1.6) -----------------------------------------------------------------


def _no_storages(pid: Any) -> Any:
    raise _Refused("refers to a storage in a header record")


def _legacy_pickle(path: Path, mapping: mmap.mmap, position: int) -> tuple[Any, int]:
    """One of the legacy format's header pickles (which may not refer to storages), and where the next starts."""
    window = _Window(mapping, position, position + PICKLE_LIMIT_BYTES)
    return _unpickle(path, window, _no_storages), window.position


def _legacy_object_start(path: Path, mapping: mmap.mmap) -> int:
    """Where the object's pickle starts, after the magic number, protocol and system info, each checked."""
    magic, position = _legacy_pickle(path, mapping, 0)
    protocol, position = _legacy_pickle(path, mapping, position)
    sys_info, position = _legacy_pickle(path, mapping, position)
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (a pickle without torch's legacy header)")
    if sys_info.get("little_endian") is not True:
        raise CheckpointError(f"{path}: is a big-endian checkpoint; {_LEGACY_ADVICE} on a little-endian machine")
    return position


class _LegacyStorages:
    """The object pickle's `persistent_load`: it records each storage's dtype and size (`declared`) and hands
    out size-only (`meta`) storages until `map_records` has mapped the storage records from the file."""

    def __init__(self, path: Path, mapping: mmap.mmap) -> None:
        self.path, self.mapping = path, mapping
        self.declared: dict[str, tuple[torch.dtype, int]] = {}
        self.roots: dict[str, torch.Tensor] = {}

    def __call__(self, pid: Any) -> _Storage:
        dtype, key, numel, view = _storage_id(self.path, pid, 6)
        if self.declared.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise _Refused(f"declares storage {key} twice with different types or sizes")
        if numel * dtype.itemsize > len(self.mapping):
            raise CheckpointError(f"{self.path}: truncated checkpoint: storage {key} needs {numel * dtype.itemsize} bytes")
        raw = self.roots.get(key, torch.empty(numel * dtype.itemsize, dtype=torch.uint8, device="meta"))
        if view is None:
            return _Storage(key, dtype, raw)
        if not (isinstance(view, tuple) and len(view) == 3 and _is_index(view[1]) and _is_index(view[2])):
            raise _Refused(f"declares a malformed view of storage {key}")
        begin, end = view[1] * dtype.itemsize, (view[1] + view[2]) * dtype.itemsize
        if end > raw.numel():
            raise _Refused(f"declares a view past the end of storage {key}")
        return _Storage(f"{key}[{view[1]}:]", dtype, raw[begin:end])

    def map_records(self, keys: Any, position: int) -> None:
        """The storage records from `position`, in the order of `keys` (the storage list pickle), each an int64
        element count and the raw bytes; the list must name exactly the storages the object declared."""
        if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)) or set(keys) != set(self.declared):
            raise CheckpointError(f"{self.path}: corrupt checkpoint: its storage list does not match the storages its tensors use")
        for key in keys:
            dtype, numel = self.declared[key]
            if position + 8 > len(self.mapping):
                raise CheckpointError(f"{self.path}: truncated checkpoint: storage {key} is missing")
            (count,) = struct.unpack_from("<q", self.mapping, position)
            nbytes = numel * dtype.itemsize
            if count != numel or position + 8 + nbytes > len(self.mapping):
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt checkpoint: storage {key} needs {nbytes} bytes, its record says {count} "
                    f"elements and the file holds {max(0, len(self.mapping) - position - 8)} more bytes"
                )
            self.roots[key] = _mapped_bytes(self.mapping, position + 8, nbytes)
            position += 8 + nbytes


def _load_legacy(path: Path, mapping: mmap.mmap) -> Any:
    """torch < 1.6's format: pickles of the magic number, protocol, system info, the object, the storage keys;
    then per storage (in key order) an int64 element count and the raw little-endian bytes.

    The object's pickle is run twice: first with size-only (`meta`) storages to learn each storage's dtype and
    size, which the walk over the storage records needs, then with the records mapped from the file."""
    object_start = _legacy_object_start(path, mapping)
    storages = _LegacyStorages(path, mapping)
    window = _Window(mapping, object_start, object_start + PICKLE_LIMIT_BYTES)
    _unpickle(path, window, storages)  # first run: sizes only
    keys, position = _legacy_pickle(path, mapping, window.position)
    storages.map_records(keys, position)
    return _unpickle(path, _Window(mapping, object_start, object_start + PICKLE_LIMIT_BYTES), storages)


# --- entry points --------------------------------------------------------------------------------


def load_ckpt(path: Path) -> dict[str, Any]:
    """The top-level object of a PyTorch checkpoint, read by our own zip/legacy readers and inert unpickler;
    tensors are copy-on-write views of the memory-mapped file.

    Raises CheckpointError (one line) for a missing, special, unreadable, truncated, non-torch or unsafe file.
    """
    path = Path(path)
    with open_regular_file(path) as handle:
        try:
            head = handle.read(512)
            size = handle.seek(0, io.SEEK_END)
            handle.seek(0)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
        if size == 0:
            raise CheckpointError(f"{path}: empty file")
        if looks_like_safetensors(head, size):
            raise CheckpointError(f"{path}: is a .safetensors file, not a pickled checkpoint; read it with safetensors")
        if head.startswith(GGUF_MAGIC):
            raise CheckpointError(
                f"{path}: is a GGUF file, not a pickled checkpoint; GGUF files are read as a model's checkpoint (a "
                "denoiser, or a whole sd.cpp model), not here"
            )
        if head[257:262] == b"ustar":
            raise CheckpointError(
                f"{path}: is a tar-format PyTorch checkpoint (torch < 0.4), which optimized-sd does not read "
                f"(its pickles and links are not safe to follow); {_LEGACY_ADVICE}"
            )
        if not (head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (unrecognised header {head[:8]!r})")
        if head.startswith(_ZIP_MAGIC) and path.name.endswith(".safetensors"):
            raise CheckpointError(f"{path}: is a PyTorch zip checkpoint named .safetensors; rename it to .ckpt")
        try:
            # Copy-on-write: tensors may be written to (pages are then copied); the file never changes.
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot map the file ({_one_line(exc)})") from None
        obj = _load_zip(path, handle, mapping) if head.startswith(_ZIP_MAGIC) else _load_legacy(path, mapping)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def state_dict_from_ckpt(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint object: unwraps `state_dict`, keeps tensors, turns numpy scalars into tensors.

    Non-tensor entries (ints, strings, placeholders) are dropped; an empty result is an error.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    inner = obj.get("state_dict", obj)
    if not isinstance(inner, dict):
        raise CheckpointError(f"checkpoint's 'state_dict' is a {type(inner).__name__}, not a dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in inner.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint has a non-string key {str(key)[:60]!r}; not a state dict")
        tensor = _as_tensor(value)
        if tensor is not None:
            out[key] = tensor
    if not out:
        keys = ", ".join(str(k)[:60] for k in list(inner)[:8]) or "none"
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

"""Pickles and torch files built opcode by opcode, so hostile inputs need no binary fixtures."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path


def glob(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def integer(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def ints(values: tuple[int, ...]) -> bytes:
    return pickle.MARK + b"".join(integer(v) for v in values) + pickle.TUPLE


def program(body: bytes) -> bytes:
    """A protocol-2 pickle (torch.save's) of `body`, ending in STOP."""
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def storage_id(key: str, numel: int, storage: str = "FloatStorage", legacy: bool = False) -> bytes:
    """A persistent id ('storage', type, key, location, numel[, view]) as torch writes it."""
    view = pickle.NONE if legacy else b""
    return (pickle.MARK + text("storage") + glob("torch", storage) + text(key) + text("cpu") + integer(numel) + view
            + pickle.TUPLE + pickle.BINPERSID)


def tensor(key: str, numel: int, size: tuple[int, ...], stride: tuple[int, ...], hooks: bytes | None = None,
           legacy: bool = False) -> bytes:
    """`torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, hooks)`."""
    hooks = hooks if hooks is not None else glob("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    return (glob("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + storage_id(key, numel, legacy=legacy)
            + integer(0) + ints(size) + ints(stride) + pickle.NEWFALSE + hooks + pickle.TUPLE + pickle.REDUCE)


def state_dict(*items: tuple[str, bytes]) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(text(k) + v for k, v in items) + pickle.SETITEMS


def torch_zip_bytes(data_pkl: bytes, records: dict[str, bytes] | None = None) -> bytes:
    """A zip laid out as torch.save writes it: archive/data.pkl, byteorder, version, data/<key> stored."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    path.write_bytes(torch_zip_bytes(data_pkl, records))
    return path


def legacy_file(path: Path, main_pickle: bytes, storages: list[tuple[str, bytes, int]]) -> Path:
    """torch < 1.6's layout: magic, protocol, sys_info pickles, the object, the key list, then count + bytes each."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, sys_info)]
    parts += [main_pickle, pickle.dumps([key for key, _, _ in storages], protocol=2)]
    parts += [struct.pack("<q", count) + data for _, data, count in storages]
    path.write_bytes(b"".join(parts))
    return path


FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)

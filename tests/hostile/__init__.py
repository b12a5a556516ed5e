"""A corpus of hostile weight files, one entry per loader finding; it grows with each fix.

Each entry builds its file's bytes here (no binary is committed). Every loader that may be handed the file
(`inspect`, checkpoint loading, an embedding named in a prompt, a LoRA) must refuse it with one line containing
the entry's `refusal`: tests/test_hostile_files.py runs them all, and benchmarks/fuzz_loaders.py mutates them.
Depths here stay where an unbounded loader would not crash the test process; the 1 MB, 10**6-deep payload of
the issue is `deep_tuple_key(10**6)`, run only in a subprocess.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .pickles import FLOATS, glob, program, state_dict, tensor, text, torch_zip_bytes

PARAMETER_DICT = glob("torch.nn.modules.container", "ParameterDict")
SAFE_DEPTH = 1000  # deeper than the loader's bound, shallow enough for CPython to hash without crashing


@dataclass(frozen=True)
class Hostile:
    """One hostile file: how to build it, the finding it comes from, and what every refusal must say."""

    name: str
    finding: str
    build: Callable[[], bytes]
    refusal: str
    suffix: str = ".pt"

    def write(self, folder: Path, stem: str = "hostile") -> Path:
        path = folder / f"{stem}{self.suffix}"
        path.write_bytes(self.build())
        return path


def pickled(body: bytes, records: dict[str, bytes] | None = None) -> bytes:
    """A torch.save zip whose pickle is `body` (storage 0 holds four floats unless `records` says otherwise)."""
    return torch_zip_bytes(program(body), {"0": FLOATS} if records is None else records)


def deep_tuple_key(depth: int) -> bytes:
    """A tuple nested `depth` deep used as a dict key: CPython hashes it recursively in C (issue 25, 1)."""
    return pickled(pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth + pickle.NONE + pickle.SETITEM)


def deep_lists(depth: int) -> bytes:
    """Lists nested `depth` deep, each new list taking the last through the memo."""
    step = pickle.POP + pickle.EMPTY_LIST + pickle.BINGET + b"\x00" + pickle.APPEND + pickle.BINPUT + b"\x00"
    return pickled(pickle.EMPTY_DICT + pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + step * depth
                   + pickle.BINPUT + b"\x01" + pickle.POP + text("x") + pickle.BINGET + b"\x01" + pickle.SETITEM)


def deflate_claimed(name: str) -> bytes:
    """A torch zip whose stored record `name` is marked deflated (local header and central directory), so reading
    it runs zlib over bytes that are no deflate stream."""
    data = bytearray(pickled(state_dict(("*", tensor("0", 4, (4,), (1,))))))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        local = archive.getinfo(name).header_offset
    struct.pack_into("<H", data, local + 8, zipfile.ZIP_DEFLATED)
    central = data.find(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(name)] != name.encode():
        central = data.find(b"PK\x01\x02", central + 4)
    struct.pack_into("<H", data, central + 10, zipfile.ZIP_DEFLATED)
    return bytes(data)


def embedding_of(value: bytes) -> bytes:
    """An AUTOMATIC1111 embedding whose single vector tensor is `value`."""
    return pickled(state_dict(("string_to_param", state_dict(("*", value)))))


def lora_of(up: bytes) -> bytes:
    """A kohya LoRA whose up factor is `up`."""
    return pickled(state_dict(("lora_unet_x.lora_up.weight", up), ("lora_unet_x.lora_down.weight", tensor("0", 4, (1, 4), (4, 1)))))


CORPUS: tuple[Hostile, ...] = (
    # issue 25, 1: pickles nested deep enough to overflow the C stack
    Hostile("deep tuple as a dict key", "25.1", lambda: deep_tuple_key(SAFE_DEPTH), "its pickle nests too deeply"),
    Hostile("deep lists", "25.1", lambda: deep_lists(SAFE_DEPTH), "its pickle nests too deeply"),
    Hostile("deep MARKs", "25.1", lambda: pickled(pickle.MARK * SAFE_DEPTH + pickle.EMPTY_DICT), "its pickle nests too deeply"),
    Hostile("a cycle through a dict", "25.1",
            lambda: pickled(pickle.EMPTY_DICT + pickle.BINPUT + b"\x00" + pickle.EMPTY_LIST + pickle.BINGET + b"\x00"
                            + pickle.APPEND + pickle.BINPUT + b"\x01" + pickle.POP + text("x") + pickle.BINGET + b"\x01"
                            + pickle.SETITEM),
            "fills a container after placing it in another"),
    Hostile("a list inside itself", "25.1",
            lambda: pickled(pickle.EMPTY_DICT + text("x") + pickle.EMPTY_LIST + pickle.DUP + pickle.APPEND + pickle.SETITEM),
            "places a container inside itself"),
    Hostile("a tuple as a dict key", "25.1",
            lambda: pickled(pickle.EMPTY_DICT + text("a") + pickle.TUPLE1 + pickle.NONE + pickle.SETITEM),
            "uses a tuple as a dict key"),
    Hostile("a tuple in a set", "25.1",
            lambda: pickled(state_dict(("s", glob("builtins", "set") + pickle.EMPTY_LIST + text("a") + pickle.TUPLE1
                                        + pickle.APPEND + pickle.TUPLE1 + pickle.REDUCE))),
            "uses a tuple as a set item"),
    Hostile("a tuple in a frozenset", "25.1",
            lambda: pickled(state_dict(("s", pickle.MARK + text("a") + pickle.TUPLE1 + pickle.FROZENSET))),
            "uses a tuple as a set item"),
    Hostile("a record deflated from no deflate stream", "25 (fuzzing)", lambda: deflate_claimed("archive/byteorder"),
            "truncated or corrupt zip checkpoint (archive/byteorder: Error -3 while decompressing data"),
    # issue 25, 7: views that ask for more elements than their storage holds, or alias them
    Hostile("stride-0 embedding asking for 16 GiB", "25.7",
            lambda: embedding_of(tensor("0", 4, (2**20, 2**12), (0, 0))),
            "rebuilds a tensor of 4,294,967,296 elements from storage 0, which holds 4"),
    Hostile("stride-0 LoRA asking for 1 TiB", "25.7",
            lambda: lora_of(tensor("0", 4, (2**20, 2**18), (0, 1))),
            "rebuilds a tensor of 274,877,906,944 elements from storage 0, which holds 4"),
    Hostile("stride-0 view within its storage", "25.7", lambda: embedding_of(tensor("0", 4, (2, 2), (0, 1))),
            "whose elements overlap"),
    Hostile("overlapping strides", "25.7", lambda: embedding_of(tensor("0", 4, (2, 2), (1, 1))), "whose elements overlap"),
    # issue 25, 12: original textual-inversion ParameterDicts are read, but only as tensors by name
    Hostile("ParameterDict with arguments", "25.12",
            lambda: pickled(state_dict(("string_to_param", PARAMETER_DICT + text("x") + pickle.TUPLE1 + pickle.NEWOBJ))),
            "builds a torch.nn.ParameterDict with arguments"),
    Hostile("ParameterDict holding a string", "25.12",
            lambda: pickled(state_dict(("string_to_param", PARAMETER_DICT + pickle.EMPTY_TUPLE + pickle.NEWOBJ
                                        + state_dict(("_parameters", state_dict(("*", text("x"))))) + pickle.BUILD))),
            "without a _parameters dict of named tensors"),
)

"""Fuzz the checkpoint loaders in-process: mutated safetensors headers, zip records and pickles.

Seeds are genuine tiny files written here (torch.save zip and legacy formats, safetensors, GGUF); each input is a
mutation of one, run through the loaders (`load_ckpt` + `state_dict_from_ckpt` with every tensor read,
`SafetensorsSource` with every tensor read, and now and then `describe_checkpoint`). A loader may refuse an
input only with a UserError (CheckpointError); any other exception, a change to torch's classes, or resident
memory growing past --max-rss-growth-mb is a crash: printed, counted, and the exit status is 1.

    nice -n 10 python benchmarks/fuzz_loaders.py --minutes 3
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import pickletools
import random
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from optimized_sd.errors import UserError  # noqa: E402
from optimized_sd.weights.ckpt import load_ckpt, state_dict_from_ckpt  # noqa: E402
from optimized_sd.weights.gguf import read_gguf  # noqa: E402
from optimized_sd.weights.inspect import describe_checkpoint  # noqa: E402
from optimized_sd.weights.sources import SafetensorsSource  # noqa: E402

# --- seeds -------------------------------------------------------------------------------------------


def seed_state() -> dict[str, object]:
    """A small Lightning-shaped checkpoint: shared-storage views, several dtypes, numpy scalars, containers."""
    base = torch.arange(24, dtype=torch.float32)
    return {
        "state_dict": OrderedDict(
            w=base[:12].view(3, 4), b=base[12:], h=torch.ones(5, dtype=torch.float16), i=torch.arange(3),
            p=torch.nn.Parameter(torch.zeros(2)), e=torch.empty(0, 4), bf=torch.ones(2, dtype=torch.bfloat16),
        ),
        "epoch": np.int64(6), "score": np.float32(0.5), "size": torch.Size([2, 3]), "tags": {"a", "b"},
        "dtype": torch.float16, "raw": b"\x00\x01",
    }


def seed_files() -> dict[str, bytes]:
    state = seed_state()
    zip_buffer, legacy_buffer = io.BytesIO(), io.BytesIO()
    torch.save(state, zip_buffer)
    torch.save(state, legacy_buffer, _use_new_zipfile_serialization=False)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.safetensors"
        save_file({"a": torch.ones(3, 4), "b": torch.arange(6, dtype=torch.int32), "c": torch.zeros(0, 2)}, str(path),
                  metadata={"format": "pt"})
        safetensors = path.read_bytes()
    return {"zip": zip_buffer.getvalue(), "legacy": legacy_buffer.getvalue(), "safetensors": safetensors}


# --- mutators ----------------------------------------------------------------------------------------

INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]
PICKLE_INSERTS = [
    pickle.BUILD, pickle.SETITEM, pickle.SETITEMS, pickle.APPEND, pickle.APPENDS, pickle.ADDITEMS, pickle.REDUCE,
    pickle.NEWOBJ, pickle.MARK, pickle.POP, pickle.DUP, pickle.TUPLE, pickle.EMPTY_DICT, pickle.EMPTY_LIST,
    pickle.EMPTY_TUPLE, pickle.NONE, pickle.NEWTRUE, pickle.STOP, pickle.BINPERSID, pickle.MEMOIZE,
    pickle.BINGET + b"\x00", pickle.BINGET + b"\x02", pickle.BININT1 + b"\x05", pickle.BININT + struct.pack("<i", -3),
    pickle.GLOBAL + b"torch\nUntypedStorage\n", pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n",
    pickle.GLOBAL + b"collections\nOrderedDict\n", pickle.GLOBAL + b"_codecs\nencode\n", pickle.GLOBAL + b"numpy\ndtype\n",
    pickle.GLOBAL + b"torch\nFloatStorage\n", pickle.GLOBAL + b"builtins\nset\n", pickle.GLOBAL + b"os\nsystem\n",
    pickle.GLOBAL + b"pytorch_lightning.callbacks.x\nX\n", pickle.EXT1 + b"\x01", pickle.FRAME + struct.pack("<Q", 2**40),
    pickle.BINUNICODE + struct.pack("<I", 2**31) + b"x", pickle.LONG4 + struct.pack("<i", 2**30), b"(X\x07\x00\x00\x00storage",
]


def mutate_bytes(rng: random.Random, data: bytes, *, region: tuple[int, int] | None = None, count: int = 0) -> bytes:
    """Flip, overwrite, insert, delete or duplicate a few bytes (within `region` when given)."""
    out = bytearray(data)
    lo, hi = region or (0, len(out))
    for _ in range(count or rng.randint(1, 4)):
        if min(hi, len(out)) <= lo:
            break
        at = rng.randrange(lo, min(hi, len(out)))
        choice = rng.randrange(6)
        if choice == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif choice == 1:
            out[at] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif choice == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 3:
            del out[at : at + rng.randint(1, 8)]
        elif choice == 4 and at + 8 <= len(out):
            struct.pack_into("<Q", out, at, rng.choice(INTERESTING_INTS) % 2**64)
        else:
            out[at:at] = out[at : at + rng.randint(1, 32)]
    return bytes(out)


def mutate_pickle(rng: random.Random, data: bytes) -> bytes:
    """Opcode-aware mutations: delete, duplicate, swap or insert whole opcodes, change integer arguments."""
    try:
        ops = [(pos, op, arg) for op, arg, pos in pickletools.genops(data)]
    except Exception:  # noqa: BLE001 - an already broken pickle: fall back to bytes
        return mutate_bytes(rng, data)
    bounds = [pos for pos, _, _ in ops] + [len(data)]
    pieces = [data[bounds[i] : bounds[i + 1]] for i in range(len(ops))]
    for _ in range(rng.randint(1, 3)):
        if not pieces:
            break
        i = rng.randrange(len(pieces))
        choice = rng.randrange(6)
        if choice == 0:
            del pieces[i]
        elif choice == 1:
            pieces.insert(i, pieces[i])
        elif choice == 2:
            j = rng.randrange(len(pieces))
            pieces[i], pieces[j] = pieces[j], pieces[i]
        elif choice == 3:
            pieces.insert(i, rng.choice(PICKLE_INSERTS))
        elif choice == 4 and i < len(ops) and ops[i][1].name in ("BININT", "BININT1", "BININT2", "LONG1"):
            pieces[i] = pickle.LONG1 + bytes([8]) + (rng.choice(INTERESTING_INTS) % 2**64).to_bytes(8, "little")
        else:
            pieces[i] = mutate_bytes(rng, pieces[i], count=1)
    return b"".join(pieces)


def rezip(data: bytes, transform: Callable[[str, bytes], bytes | None]) -> bytes:
    """Rewrite a torch zip with `transform(name, bytes)` applied to each record (None drops it); CRCs stay valid."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            new = transform(info.filename, zin.read(info.filename))
            if new is not None:
                zout.writestr(info.filename, new)
    return out.getvalue()


def mutate_zip(rng: random.Random, data: bytes) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:  # the pickle, opcode-aware, with valid CRCs so the unpickler sees it
        return rezip(data, lambda name, raw: mutate_pickle(rng, raw) if name.endswith("data.pkl") else raw)
    if choice == 1:  # a tensor record shortened, lengthened or dropped
        victim = f"/data/{rng.randrange(8)}"
        return rezip(data, lambda name, raw: rng.choice([None, raw[: rng.randrange(len(raw) + 1)], raw + b"\x00" * 8])
                     if name.endswith(victim) else raw)
    if choice == 2:  # the byte-order or version record
        return rezip(data, lambda name, raw: rng.choice([b"big", b"", b"little" * 3]) if name.endswith("byteorder") else raw)
    # raw bytes: local headers, central directory, end record
    directory = data.rfind(b"PK\x01\x02")
    region = (max(0, directory - 200), len(data)) if choice == 3 and directory > 0 else None
    return mutate_bytes(rng, data, region=region)


def mutate_legacy(rng: random.Random, data: bytes) -> bytes:
    if rng.random() < 0.6:
        return mutate_pickle(rng, data)  # genops walks the first pickles; mutations land in the headers or object
    return mutate_bytes(rng, data)


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    (length,) = struct.unpack_from("<Q", data)
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    choice = rng.randrange(5)
    if choice == 0:  # a field of one entry replaced by something odd
        key = rng.choice(list(header))
        entry = header[key]
        field = rng.choice(list(entry) if isinstance(entry, dict) else ["dtype"])
        odd = [rng.choice(INTERESTING_INTS), -1, 0.5, "F7", "F16", None, [], [[1]], {"a": 1}, [1] * 40, [2**31] * 4,
               [0, 0], [8, 4], [0, 2**40], [True], "x" * 100]
        if isinstance(entry, dict):
            entry[field] = rng.choice(odd)
        else:
            header[key] = rng.choice(odd)
    elif choice == 1:  # entries deleted or duplicated under new names (overlaps)
        key = rng.choice(list(header))
        if rng.random() < 0.5:
            del header[key]
        else:
            header[key + "2"] = header[key]
    elif choice == 2:  # deep nesting or a huge integer
        depth = rng.choice([10, 1000, 100_000])
        text = json.dumps(header)[:-1] + ', "z": ' + "[" * depth + "]" * depth + "}"
        raw = text.encode() if rng.random() < 0.5 else text.replace("[0,", "[" + "9" * 400 + ",", 1).encode()
        return struct.pack("<Q", len(raw)) + raw + body
    elif choice == 3:  # the length prefix
        return struct.pack("<Q", rng.choice(INTERESTING_INTS) % 2**64) + data[8:]
    else:
        return mutate_bytes(rng, data, region=(0, 8 + length))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# --- GGUF: a writer-made seed, mutated in its header (counts, lengths, types, dims, offsets) -----------------


def gguf_seed() -> bytes:
    """A tiny GGUF by the `gguf` package's writer: metadata of several types, an orig_shape key, three tensor types."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.gguf"
        writer = gguf.GGUFWriter(str(path), arch="sdxl")
        writer.add_array("comfy.gguf.orig_shape.conv.weight", [2, 4, 4, 8])
        writer.add_array("tags", ["a", "bc"])
        writer.add_float32("scale", 0.5)
        values = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
        writer.add_tensor("conv.weight", gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("bias", np.ones(8, dtype=np.float16))
        writer.add_tensor("k.weight", np.zeros((2, 144), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def mutate_gguf(rng: random.Random, data: bytes) -> bytes:
    """Header bytes mostly (where the parser's decisions are), 32-bit fields set to odd values, or a truncation."""
    header_end = min(len(data), 600)
    choice = rng.randrange(4)
    if choice == 0 and header_end > 8:
        out = bytearray(data)
        at = rng.randrange(4, header_end - 4)
        struct.pack_into("<I", out, at, rng.choice([0, 1, 4, 5, 8, 9, 13, 20, 30, 99, 2**31, 2**32 - 1]))
        return bytes(out)
    if choice == 1:
        return data[: rng.randrange(len(data) + 1)]
    return mutate_bytes(rng, data, region=(0, header_end))


def run_gguf(path: Path) -> None:
    """Read the header, then dequantise every tensor (a bad view into the mapping would fault here)."""
    file = read_gguf(path)
    for tensor in file.state_dict().values():
        touch(tensor)
    file.close()


def add_gguf_target(seeds: dict[str, bytes], mutators: dict[str, Callable], suffix: dict[str, str]) -> None:
    seeds["gguf"], mutators["gguf"], suffix["gguf"] = gguf_seed(), mutate_gguf, ".gguf"


# --- running one input -------------------------------------------------------------------------------


def touch(tensor: torch.Tensor) -> None:
    """Read every element (a bad view into the mapping would fault here)."""
    if tensor.numel():
        tensor.to(torch.float64).sum().item()


def run_one(kind: str, path: Path, inspect: bool) -> None:
    if kind == "gguf":
        run_gguf(path)
    elif kind == "safetensors":
        source = SafetensorsSource(path)
        for key in source.keys():
            touch(source.get(key))
        source.close()
    else:
        for tensor in state_dict_from_ckpt(load_ckpt(path)).values():
            touch(tensor)
    if inspect:
        describe_checkpoint(path, hashes=False)


def process_state() -> tuple[object, ...]:
    return (dict(vars(torch.UntypedStorage)), dict(vars(torch._utils._rebuild_tensor_v2)), torch.nn.Module.dump_patches,
            dict(vars(OrderedDict)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth-mb", type=int, default=500)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    seeds = seed_files()
    mutators = {"zip": mutate_zip, "legacy": mutate_legacy, "safetensors": mutate_safetensors}
    suffix = {"zip": ".ckpt", "legacy": ".ckpt", "safetensors": ".safetensors"}
    add_gguf_target(seeds, mutators, suffix)
    baseline_state = process_state()
    baseline_rss = psutil.Process().memory_info().rss
    deadline = time.monotonic() + args.minutes * 60
    counts = {kind: 0 for kind in seeds}
    refused = crashes = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-loaders-") as folder:
        while time.monotonic() < deadline:
            kind = rng.choice(list(seeds))
            data = seeds[kind]
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                try:
                    data = mutators[kind](rng, data)
                except Exception:  # noqa: BLE001 - an earlier mutation broke the structure this one edits
                    data = mutate_bytes(rng, data)
            path = Path(folder) / f"input{suffix[kind]}"
            path.write_bytes(data)
            counts[kind] += 1
            try:
                run_one(kind, path, inspect=rng.random() < 0.1)
            except UserError as error:
                refused += 1
                if "\n" in str(error):
                    crashes += 1
                    print(f"CRASH (multi-line error) on a {kind} input: {error!r}", flush=True)
            except Exception:  # noqa: BLE001 - anything else is what we are looking for
                crashes += 1
                keep = Path(folder).parent / f"fuzz-crash-{crashes}{suffix[kind]}"
                keep.write_bytes(data)
                print(f"CRASH on a {kind} input (kept as {keep}):\n{traceback.format_exc()}", flush=True)
            if process_state() != baseline_state:
                crashes += 1
                print(f"CRASH: a {kind} input changed torch's classes or functions", flush=True)
                break
            growth = psutil.Process().memory_info().rss - baseline_rss
            if growth > args.max_rss_growth_mb * 2**20:
                crashes += 1
                print(f"CRASH: resident memory grew by {growth // 2**20} MiB on a {kind} input", flush=True)
                break
    total = sum(counts.values())
    detail = ", ".join(f"{kind} {n}" for kind, n in counts.items())
    print(f"fuzz_loaders: {total} inputs run in {args.minutes:g} min ({detail}); {refused} refused with a UserError, "
          f"{total - refused - crashes} loaded, {crashes} crashes")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())

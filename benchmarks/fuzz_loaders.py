"""Fuzz the weight and mask loaders in-process: mutated safetensors headers, zip records, pickles and images.

Seeds are genuine tiny files written here (checkpoints in torch.save's zip and legacy formats and safetensors; GGUF;
`.pt` embeddings, plain and as the original textual-inversion ParameterDict; LoRAs as .pt and .safetensors;
masks as PNG, JPEG, GIF, BMP and TIFF) plus the hostile corpus of tests/hostile. Each input is a mutation of
one, run through its loaders (`load_ckpt` + `state_dict_from_ckpt` or `SafetensorsSource` with every tensor
read, now and then `describe_checkpoint`; `read_embedding`; `read_lora` against a model with the seed's layer;
`load_mask` + `fit_mask`; corpus files through all the weight loaders). A loader may refuse an input only with a
one-line UserError; any other exception, an input taking longer than --max-seconds, a change to torch's
classes, or resident memory growing past --max-rss-growth-mb is a crash: printed, counted, exit status 1.

    nice -n 10 python benchmarks/fuzz_loaders.py --minutes 3
    nice -n 10 python benchmarks/fuzz_loaders.py --cases 400 --targets embedding,lora-pt,lora-safetensors,mask,corpus
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
import pickletools
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the hostile corpus

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from hostile import CORPUS  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from optimized_sd.config import TINY  # noqa: E402
from optimized_sd.errors import UserError  # noqa: E402
from optimized_sd.pipelines.masks import fit_mask, load_mask  # noqa: E402
from optimized_sd.weights.ckpt import load_ckpt, state_dict_from_ckpt  # noqa: E402
from optimized_sd.weights.embeddings import read_embedding  # noqa: E402
from optimized_sd.weights.family import UNET_PREFIX  # noqa: E402
from optimized_sd.weights.gguf import read_gguf  # noqa: E402
from optimized_sd.weights.inspect import describe_checkpoint  # noqa: E402
from optimized_sd.weights.lora import read_lora  # noqa: E402
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


def saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def saved_safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.safetensors"
        save_file(tensors, str(path))
        return path.read_bytes()


LORA_LAYER = "x"  # the model layer the LoRA seeds patch: `LORA_MODEL_SHAPES`
LORA_MODEL_SHAPES = {f"{UNET_PREFIX}{LORA_LAYER}.weight": (6, 8)}


def lora_seed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"lora_unet_{LORA_LAYER}.lora_down.weight": torch.randn(2, 8, generator=g),
            f"lora_unet_{LORA_LAYER}.lora_up.weight": torch.randn(6, 2, generator=g), f"lora_unet_{LORA_LAYER}.alpha": torch.tensor(1.0)}


def embedding_seeds() -> list[bytes]:
    vectors = torch.randn(2, 64)
    plain = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "seed", "step": 10}
    original = {**plain, "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)}),
                "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}
    return [saved(plain), saved(original), saved({"<concept>": vectors[0]})]


def mask_seeds() -> list[bytes]:
    """Small masks in the formats users hand in: L and RGBA PNG (alpha drawn), JPEG, GIF with transparency, BMP, TIFF."""
    gradient = Image.linear_gradient("L").resize((24, 16))
    rgba = Image.merge("RGBA", [gradient, gradient, gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    out = []
    for image, fmt, options in [(gradient, "PNG", {}), (rgba, "PNG", {}), (gradient.convert("RGB"), "JPEG", {"quality": 80}),
                                (gradient.convert("P"), "GIF", {"transparency": 0}), (gradient, "BMP", {}), (gradient, "TIFF", {})]:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        out.append(buffer.getvalue())
    return out


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


def run_gguf(path: Path, inspect: bool) -> None:
    """Read the header, dequantise every tensor (a bad view into the mapping would fault here), then open the file
    through the generation entry point (`load`: family claims, `gguf_model_source`, parts, the strict loader)."""
    from optimized_sd.pipelines.diffusion import load

    file = read_gguf(path)
    for tensor in file.state_dict().values():
        touch(tensor)
    file.close()
    if inspect:
        describe_checkpoint(path, hashes=False)
    load(path, device="cpu", precision="full", memory="full")


# --- running one input -------------------------------------------------------------------------------


def touch(tensor: torch.Tensor) -> None:
    """Read every element (a bad view into the mapping would fault here)."""
    if tensor.numel():
        tensor.to(torch.float64).sum().item()


def run_checkpoint(path: Path, inspect: bool) -> None:
    for tensor in state_dict_from_ckpt(load_ckpt(path)).values():
        touch(tensor)
    if inspect:
        describe_checkpoint(path, hashes=False)


def run_safetensors(path: Path, inspect: bool) -> None:
    source = SafetensorsSource(path)
    for key in source.keys():
        touch(source.get(key))
    source.close()
    if inspect:
        describe_checkpoint(path, hashes=False)


def run_embedding(path: Path, inspect: bool) -> None:
    for vectors in read_embedding(path).vectors:
        touch(vectors)


def run_lora(path: Path, inspect: bool) -> None:
    for patches in read_lora(path, TINY, LORA_MODEL_SHAPES).patches.values():
        for patch in patches:
            touch(patch.delta(torch.Size(LORA_MODEL_SHAPES[f"{UNET_PREFIX}{LORA_LAYER}.weight"]), torch.device("cpu")))


def run_mask(path: Path, inspect: bool) -> None:
    fit_mask(load_mask(path), (32, 32))


def run_every_weight_loader(path: Path, inspect: bool) -> None:
    """A corpus file through every loader that may be handed it; each may refuse it (in one line)."""
    refusal: UserError | None = None
    for run in (run_checkpoint, run_embedding, run_lora):
        try:
            run(path, inspect)
        except UserError as error:
            if "\n" in str(error):
                raise AssertionError(f"multi-line error from {run.__name__}: {error!r}") from None
            refusal = error
    if refusal is not None:
        raise refusal


@dataclass(frozen=True)
class Target:
    """One kind of input: its seeds, its file suffix, how it is mutated and which loaders it goes through."""

    seeds: list[bytes]
    suffix: str
    mutate: Callable[[random.Random, bytes], bytes]
    run: Callable[[Path, bool], None]


def targets() -> dict[str, Target]:
    checkpoints = seed_files()
    return {
        "zip": Target([checkpoints["zip"]], ".ckpt", mutate_zip, run_checkpoint),
        "legacy": Target([checkpoints["legacy"]], ".ckpt", mutate_legacy, run_checkpoint),
        "safetensors": Target([checkpoints["safetensors"]], ".safetensors", mutate_safetensors, run_safetensors),
        "embedding": Target(embedding_seeds(), ".pt", mutate_zip, run_embedding),
        "lora-pt": Target([saved(lora_seed())], ".pt", mutate_zip, run_lora),
        "lora-safetensors": Target([saved_safetensors(lora_seed())], ".safetensors", mutate_safetensors, run_lora),
        "mask": Target(mask_seeds(), ".png", lambda rng, data: mutate_bytes(rng, data, count=rng.randint(1, 8)), run_mask),
        "gguf": Target([gguf_seed()], ".gguf", mutate_gguf, run_gguf),
        "corpus": Target([entry.build() for entry in CORPUS], ".pt", mutate_zip, run_every_weight_loader),
    }


class Hang(Exception):
    """An input took longer than --max-seconds."""


def process_state() -> tuple[object, ...]:
    return (dict(vars(torch.UntypedStorage)), dict(vars(torch._utils._rebuild_tensor_v2)), torch.nn.Module.dump_patches,
            dict(vars(OrderedDict)), dict(vars(torch.nn.ParameterDict)), dict(vars(torch.nn.Module)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--cases", type=int, default=0, help="stop after this many inputs (0: run for --minutes)")
    parser.add_argument("--targets", default="", help="comma-separated kinds of input (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=int, default=30, help="one input running longer is a hang")
    parser.add_argument("--max-rss-growth-mb", type=int, default=500)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    kinds = targets()
    if args.targets:
        unknown = set(args.targets.split(",")) - set(kinds)
        if unknown:
            parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(kinds)}")
        kinds = {kind: kinds[kind] for kind in args.targets.split(",")}

    def hang(signum: int, frame: object) -> None:
        raise Hang(f"one input ran past {args.max_seconds} s")

    signal.signal(signal.SIGALRM, hang)
    logging.getLogger("optimized_sd").setLevel(logging.ERROR)  # resized-mask warnings
    warnings.simplefilter("ignore")  # PIL's on corrupt images: they are what the inputs are
    baseline_state = process_state()
    baseline_rss = psutil.Process().memory_info().rss
    deadline = time.monotonic() + args.minutes * 60
    counts = {kind: 0 for kind in kinds}
    refused = crashes = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-loaders-") as folder:
        while (sum(counts.values()) < args.cases) if args.cases else (time.monotonic() < deadline):
            kind = rng.choice(list(kinds))
            target = kinds[kind]
            data = rng.choice(target.seeds)
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                try:
                    data = target.mutate(rng, data)
                except Exception:  # noqa: BLE001 - an earlier mutation broke the structure this one edits
                    data = mutate_bytes(rng, data)
            path = Path(folder) / f"input{target.suffix}"
            path.write_bytes(data)
            counts[kind] += 1
            signal.alarm(args.max_seconds)
            try:
                target.run(path, rng.random() < 0.1)
            except UserError as error:
                refused += 1
                if "\n" in str(error):
                    crashes += 1
                    print(f"CRASH (multi-line error) on a {kind} input: {error!r}", flush=True)
            except Exception:  # noqa: BLE001 - anything else (a Hang included) is what we are looking for
                crashes += 1
                keep = Path(folder).parent / f"fuzz-crash-{crashes}{target.suffix}"
                keep.write_bytes(data)
                print(f"CRASH on a {kind} input (kept as {keep}):\n{traceback.format_exc()}", flush=True)
            finally:
                signal.alarm(0)
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
    print(f"fuzz_loaders: {total} inputs ({detail}); {refused} refused with a UserError, "
          f"{total - refused - crashes} loaded, {crashes} crashes")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())

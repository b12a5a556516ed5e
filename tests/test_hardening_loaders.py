"""Issue 11, loader half: a corpus of crafted checkpoints, built opcode by opcode (hostile.pickles; no binary fixtures).

Every case must end in one `error:` line with exit status 1 through the CLI (`inspect` and `txt2img`), leave
no file and no marker behind, change no class or function of the process, and leave the loader working.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from cli_runs import run_cli as cli
from hostile.pickles import FLOATS, glob, integer, legacy_file, program, state_dict, tensor, text, torch_zip

import optimized_sd.weights.ckpt as ckpt_module
from optimized_sd.errors import CheckpointError
from optimized_sd.pipelines.output import check_output_folder
from optimized_sd.weights.ckpt import load_ckpt, state_dict_from_ckpt
from optimized_sd.weights.inspect import describe_checkpoint
from optimized_sd.weights.sources import SafetensorsSource

from lightning_checkpoints import tiny_sd1, write_lightning_ckpt


def crafted_pickles(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Crafted pickles -> the fragment the refusal must name. Any that ran would create or touch `marker`."""
    lightning = glob("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    return {
        "BUILD on an allowed function": (
            glob("torch._utils", "_rebuild_tensor_v2") + pickle.EMPTY_DICT + text("dump_patches") + pickle.NEWTRUE
            + pickle.SETITEM + pickle.BUILD, "sets state (BUILD) on torch._utils._rebuild_tensor_v2"),
        "BUILD on a storage class": (
            glob("torch", "UntypedStorage") + pickle.EMPTY_DICT + text("nbytes") + text(str(marker)) + pickle.SETITEM
            + pickle.BUILD, "sets state (BUILD) on torch.UntypedStorage"),
        "BUILD on a placeholder class": (
            lightning + pickle.EMPTY_DICT + pickle.BUILD, "sets state (BUILD) on the class pytorch_lightning"),
        "BUILD on a dtype": (glob("torch", "float32") + pickle.EMPTY_DICT + pickle.BUILD, "sets state (BUILD) on a dtype"),
        "SETITEM on a storage class": (
            glob("torch", "UntypedStorage") + text("nbytes") + pickle.NONE + pickle.SETITEM, "sets items on torch.UntypedStorage"),
        "SETITEMS on a placeholder class": (
            lightning + pickle.MARK + text("__init__") + pickle.NONE + pickle.SETITEMS, "sets items on the class"),
        "APPEND to a callable": (
            glob("collections", "OrderedDict") + text(str(marker)) + pickle.APPEND, "appends to collections.OrderedDict"),
        "ADDITEMS to a callable": (
            glob("builtins", "set") + pickle.MARK + text(str(marker)) + pickle.ADDITEMS, "adds items to set"),
        "codec lookup by name": (
            glob("_codecs", "encode") + text(str(marker)) + text("rot13") + pickle.TUPLE2 + pickle.REDUCE,
            "calls _codecs.encode with str and 'rot13'"),
        "os.system": (
            glob("os", "system") + text(f"touch {marker}") + pickle.TUPLE1 + pickle.REDUCE, "asks for the global 'os.system'"),
        "INST of os.system": (
            pickle.MARK + text(f"touch {marker}") + pickle.INST + b"os\nsystem\n", "asks for the global 'os.system'"),
        "OBJ of open": (
            pickle.MARK + glob("builtins", "open") + text(str(marker)) + text("w") + pickle.OBJ,
            "asks for the global 'builtins.open'"),
        "NEWOBJ on a function": (
            glob("torch._utils", "_rebuild_tensor_v2") + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
            "calls torch._utils._rebuild_tensor_v2 with 0 arguments"),
        "calling a dtype": (glob("torch", "float32") + pickle.EMPTY_TUPLE + pickle.REDUCE, "calls a dtype"),
        "extension registry": (pickle.EXT1 + b"\x01", "uses the copyreg extension registry"),
        "module persistent id": (
            pickle.MARK + text("module") + glob("torch", "Tensor") + text(str(marker)) + text("source") + pickle.TUPLE
            + pickle.BINPERSID, "uses the persistent id 'module'"),
        "tensor past its storage": (
            state_dict(("w", tensor("0", 4, (2,), (1000,)))), "reaching element 1000 of storage 0, which holds 4"),
        "tensor with a negative stride": (
            state_dict(("w", tensor("0", 4, (2,), (-1,)))), "negative or non-integer offset"),
        "tensor with backward hooks": (
            state_dict(("w", tensor("0", 4, (4,), (1,), hooks=glob("collections", "OrderedDict") + pickle.EMPTY_TUPLE
                                    + pickle.REDUCE + text("h") + glob("torch", "float32") + pickle.SETITEM))),
            "attaches backward hooks"),
        "structured numpy dtype": (
            glob("numpy", "dtype") + text("f8") + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE
            + pickle.MARK + integer(3) + text("<") + text(str(marker)) + pickle.NONE + pickle.NONE + integer(-1)
            + integer(-1) + integer(0) + pickle.TUPLE + pickle.BUILD, "builds a structured or sub-array numpy dtype"),
    }


def process_state() -> dict[str, object]:
    """What a payload that escaped would change: torch's storage class, the rebuild helpers, Module.dump_patches."""
    return {
        "UntypedStorage": dict(vars(torch.UntypedStorage)),
        "rebuild": dict(vars(torch._utils._rebuild_tensor_v2)),
        "dump_patches": torch.nn.Module.dump_patches,
        "float32": repr(torch.float32),
    }


@pytest.fixture
def genuine(tmp_path: Path) -> Callable[[], None]:
    """Load a genuine Lightning .ckpt and check its tensors: the loader still works after a refusal."""
    sd = tiny_sd1()
    path = tmp_path / "genuine.ckpt"
    write_lightning_ckpt(path, sd)

    def check() -> None:
        got = state_dict_from_ckpt(load_ckpt(path))
        assert all(torch.equal(got[k], v) for k, v in sd.items())

    return check




def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_cli_refuses(capsys, tiny_model, tmp_path: Path, checkpoint: Path, fragment: str) -> None:
    """`inspect` and `txt2img` on `checkpoint`: one `error:` line naming `fragment`, status 1, nothing written."""
    outdir = tmp_path / "out"
    for args in (["inspect", checkpoint],
                 ["txt2img", "--ckpt", checkpoint, "--tokenizer", tiny_model.tokenizer, "--outdir", outdir,
                  "--H", "64", "--W", "64", "--ddim_steps", "1", "--n_samples", "1", "--device", "cpu"]):
        code, out, err = cli(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 1, (args[0], out, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert fragment in lines[0], lines[0]
        assert "Traceback" not in err
        assert files(outdir) == []


# --- 1/2: pickles are read by our own inert unpickler ------------------------------------------------


@pytest.mark.parametrize("case", list(crafted_pickles(Path("m"))))
def test_crafted_pickle_is_refused_inertly(tmp_path: Path, capsys, tiny_model, genuine, case: str) -> None:
    marker = tmp_path / "marker"
    body, fragment = crafted_pickles(marker)[case]
    path = torch_zip(tmp_path / "crafted.ckpt", program(body), {"0": FLOATS})
    before = process_state()

    with pytest.raises(CheckpointError) as refused:
        load_ckpt(path)

    message = str(refused.value)
    assert "\n" not in message and fragment in message and str(path) in message
    assert process_state() == before
    assert not marker.exists()
    assert_cli_refuses(capsys, tiny_model, tmp_path, path, fragment)
    assert not marker.exists()
    genuine()


def test_legacy_module_persistent_id_is_refused(tmp_path: Path, genuine) -> None:
    """The issue's exploit path: torch's legacy reader acted on a ('module', ...) id; ours refuses it."""
    marker = tmp_path / "marker.patch"
    body = (state_dict(("w", tensor("k", 4, (4,), (1,), legacy=True)))
            + glob("torch._utils", "_rebuild_tensor_v2") + pickle.EMPTY_DICT + pickle.BUILD)
    evil = program(pickle.MARK + text("module") + glob("torch", "Tensor") + text(str(marker)) + text("class X: pass")
                   + pickle.TUPLE + pickle.BINPERSID + pickle.POP + body)
    path = legacy_file(tmp_path / "legacy.ckpt", evil, [("k", FLOATS, 4)])
    before = process_state()
    with pytest.raises(CheckpointError, match="uses the persistent id 'module'"):
        load_ckpt(path)
    assert process_state() == before and not marker.exists() and not list(tmp_path.glob("*.patch"))
    genuine()


def test_hand_built_legacy_file_loads_through_our_reader(tmp_path: Path) -> None:
    """The legacy reader follows the documented layout: a view tensor and a second storage land on the right bytes."""
    main_pickle = program(state_dict(("w", tensor("a", 4, (2, 2), (2, 1), legacy=True)),
                                     ("v", tensor("b", 2, (1,), (1,), legacy=True))))
    path = legacy_file(tmp_path / "legacy.ckpt", main_pickle, [("a", FLOATS, 4), ("b", struct.pack("<2f", 5, 6), 2)])
    obj = load_ckpt(path)
    assert torch.equal(obj["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]])) and torch.equal(obj["v"], torch.tensor([5.0]))


@pytest.mark.parametrize("problem", ["count differs", "short data", "key list differs"])
def test_legacy_storage_records_are_checked(tmp_path: Path, problem: str) -> None:
    main_pickle = program(state_dict(("w", tensor("a", 4, (4,), (1,), legacy=True))))
    storages = {"count differs": [("a", FLOATS, 5)], "short data": [("a", FLOATS[:8], 4)],
                "key list differs": [("zz", FLOATS, 4)]}[problem]
    path = legacy_file(tmp_path / "legacy.ckpt", main_pickle, storages)
    with pytest.raises(CheckpointError, match="truncated|corrupt") as refused:
        load_ckpt(path)
    assert "\n" not in str(refused.value)


def test_tar_format_is_refused_without_following_its_links(tmp_path: Path, capsys, tiny_model) -> None:
    path = tmp_path / "old.ckpt"
    with tarfile.open(path, "w") as archive:
        for name, target in (("pickle", "/etc/passwd"), ("storages", str(tmp_path / "fifo"))):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            archive.addfile(link)
    with pytest.raises(CheckpointError, match="tar-format PyTorch checkpoint .* re-save it with a current torch"):
        load_ckpt(path)
    assert_cli_refuses(capsys, tiny_model, tmp_path, path, "convert it to .safetensors")


def test_zip_symlink_record_is_data_not_a_link(tmp_path: Path) -> None:
    """A record marked as a symlink is read as its stored bytes (the link text), never followed."""
    path = tmp_path / "link.ckpt"
    target = b"/etc/passwd\x00\x00\x00\x00\x00"  # 16 bytes: exactly one float32 x 4 storage
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", program(state_dict(("w", tensor("0", 4, (4,), (1,))))))
        link = zipfile.ZipInfo("archive/data/0")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, target)
    assert load_ckpt(path)["w"].numpy().tobytes() == target


def test_every_allowed_global_still_loads_genuine_files(tmp_path: Path) -> None:
    """bf16, views sharing a storage, Parameters, numpy scalars, sets, Size, device: all through the inert path."""
    base = torch.arange(12, dtype=torch.float32)
    obj = {"state_dict": {"a": base[2:8].view(2, 3), "b": base, "h": torch.ones(3, dtype=torch.bfloat16),
                          "p": torch.nn.Parameter(torch.zeros(2)), "e": torch.empty(0, 5)},
           "n": np.int64(-5), "f": np.float16(0.5), "flag": np.bool_(True), "size": torch.Size([1, 2]),
           "device": torch.device("cpu"), "tags": {1, 2}, "frozen": frozenset({"x"}), "raw": b"\x00\xff"}
    path = tmp_path / "mixed.ckpt"
    torch.save(obj, path)
    got = load_ckpt(path)
    for key in ("a", "b", "h", "p", "e"):
        assert torch.equal(got["state_dict"][key], obj["state_dict"][key]), key
    assert got["state_dict"]["a"].data_ptr() == got["state_dict"]["b"].data_ptr() + 8  # one shared mapped storage
    assert got["n"] == -5 and got["f"] == np.float16(0.5) and bool(got["flag"]) is True
    assert got["size"] == torch.Size([1, 2]) and got["device"] == torch.device("cpu")
    assert got["tags"] == {1, 2} and got["frozen"] == frozenset({"x"}) and got["raw"] == b"\x00\xff"
    got["state_dict"]["b"][0] = 99  # copy-on-write mapping: writable, the file is untouched
    assert torch.equal(load_ckpt(path)["state_dict"]["b"], base)


# --- 3: small files that cost a lot ------------------------------------------------------------------


def test_pickle_inflating_past_the_limit_is_refused_from_the_directory(tmp_path: Path, capsys, tiny_model) -> None:
    path = tmp_path / "bomb.ckpt"
    chunk = b"N0" * (2**19)  # 1 MiB of NONE/POP: deflates to almost nothing
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as record:
            record.write(pickle.PROTO + b"\x02")
            for _ in range(ckpt_module.PICKLE_LIMIT_BYTES // len(chunk) + 8):
                record.write(chunk)
            record.write(pickle.NONE + pickle.STOP)
    assert path.stat().st_size < 2**20
    rss = psutil.Process().memory_info().rss
    with pytest.raises(CheckpointError, match=r"would inflate to [\d,]+ bytes, past the 64 MiB limit"):
        load_ckpt(path)
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20
    assert_cli_refuses(capsys, tiny_model, tmp_path, path, "past the 64 MiB limit")


def test_zip_directory_understating_the_pickle_is_cut_at_the_stated_size(tmp_path: Path) -> None:
    path = torch_zip(tmp_path / "liar.ckpt", program(pickle.NONE * 4000))
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # data.pkl is the first record in the central directory
    struct.pack_into("<I", data, central + 24, 10)  # the central directory now says data.pkl holds 10 bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|ends early") as refused:
        load_ckpt(path)
    assert "\n" not in str(refused.value)


def test_opcode_budget_bounds_a_small_pickle_that_builds_much(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ckpt_module, "PICKLE_LIMIT_OPCODES", 1000)
    path = torch_zip(tmp_path / "many.ckpt", program(pickle.EMPTY_LIST + (pickle.EMPTY_DICT + pickle.APPEND) * 600))
    with pytest.raises(CheckpointError, match="runs past 1,000 opcodes"):
        load_ckpt(path)


@contextmanager
def no_hang(seconds: int = 20) -> Iterator[None]:
    """Fail (not hang) if the block blocks, e.g. in open() of a FIFO."""

    def timeout(signum: int, frame: object) -> None:
        raise TimeoutError("blocked: the loader opened a FIFO for reading")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors"])
def test_fifo_checkpoint_is_refused_without_opening_it(tmp_path: Path, capsys, tiny_model, name: str) -> None:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with no_hang():
        with pytest.raises(CheckpointError, match="is a FIFO, not a regular file"):
            (SafetensorsSource if name.endswith(".safetensors") else load_ckpt)(fifo)
        with pytest.raises(CheckpointError, match="is a FIFO"):
            describe_checkpoint(fifo)
        assert_cli_refuses(capsys, tiny_model, tmp_path, fifo, "not a")  # "is a FIFO, not a regular file" / "is not a file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("member", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
def test_fifo_in_a_diffusers_folder_is_refused(tmp_path: Path, capsys, tiny_model, member: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for part in ("vae", "text_encoder", "tokenizer", "model_index.json"):
        (folder / part).symlink_to(tiny_model.folder / part)
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").symlink_to(tiny_model.folder / "unet" / "config.json")
    os.mkfifo(folder / "unet" / member)
    with no_hang():
        code, _, err = cli(capsys, "inspect", folder)
        assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "FIFO" in err
        code, _, err = cli(capsys, "txt2img", "--ckpt", folder, "--outdir", tmp_path / "out", "--H", "64", "--W", "64",
                           "--ddim_steps", "1", "--n_samples", "1", "--device", "cpu")
        assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert files(tmp_path / "out") == []


# --- 4: safetensors headers -------------------------------------------------------------------------


def safetensors_bytes(header: object | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def f32(shape: list[int], begin: int, end: int, dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MALFORMED_HEADERS: dict[str, tuple[bytes, str]] = {
    "not an object": (safetensors_bytes([1, 2]), "it is a JSON list, not an object"),
    "deep nesting": (safetensors_bytes(b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nests too deeply"),
    "huge integer": (safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [' + b"9" * 400 + b'], "data_offsets": [0, 4]}}'),
                     "is too large"),
    "float offsets": (safetensors_bytes({"w": f32([1], 0.0, 4)}, FLOATS), "tensor 'w' has data_offsets [0.0, 4]"),
    "begin after end": (safetensors_bytes({"w": f32([1], 8, 4)}, FLOATS), "tensor 'w' has data_offsets [8, 4]"),
    "length not shape x dtype": (safetensors_bytes({"w": f32([2], 0, 4)}, FLOATS), "tensor 'w' holds 4 bytes, but shape (2,)"),
    "zero-length for a non-empty shape": (safetensors_bytes({"w": f32([4], 0, 0)}, FLOATS),
                                          "tensor 'w' holds 0 bytes, but shape (4,) of F32 needs 16"),
    "overlapping": (safetensors_bytes({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, FLOATS), "tensor 'b' overlaps tensor 'a'"),
    "unknown dtype": (safetensors_bytes({"w": f32([1], 0, 4, "F7")}, FLOATS), "tensor 'w' has unknown dtype 'F7'"),
    "negative size": (safetensors_bytes({"w": f32([-1], 0, 4)}, FLOATS), "tensor 'w' has shape [-1]"),
    "too many dims": (safetensors_bytes({"w": f32([1] * 40, 0, 4)}, FLOATS), "tensor 'w' has 40 dimensions"),
    "product overflow": (safetensors_bytes({"w": f32([2**31] * 4, 0, 16)}, FLOATS), "tensor 'w' holds 16 bytes, but shape"),
    "boolean size": (safetensors_bytes({"w": f32([True], 0, 4)}, FLOATS), "tensor 'w' has shape [True]"),
    "metadata not str->str": (safetensors_bytes({"__metadata__": {"a": 1}, "w": f32([1], 0, 4)}, FLOATS),
                              "__metadata__ must map strings to strings"),
    "metadata a list": (safetensors_bytes({"__metadata__": ["a"]}), "__metadata__ must map strings to strings"),
    "duplicate key": (safetensors_bytes(b'{"w": {}, "w": {}}'), "key 'w' appears twice"),
    "NaN": (safetensors_bytes(b'{"w": NaN}'), "NaN is not allowed"),
    "entry not an object": (safetensors_bytes({"w": 3}, FLOATS), "tensor 'w' is a JSON int, not an object"),
    "past the data": (safetensors_bytes({"w": f32([8], 0, 32)}, FLOATS), "tensor 'w' ends at byte 32"),
    "header length past the file": (safetensors_bytes({"w": f32([1], 0, 4)}, header_len=2**40),
                                    "header length 1099511627776 does not fit"),
    "not UTF-8": (safetensors_bytes(b'{"\xff": 1}'), "not UTF-8"),
}


@pytest.mark.parametrize("case", list(MALFORMED_HEADERS))
def test_malformed_safetensors_header_is_one_line_everywhere(tmp_path: Path, capsys, tiny_model, case: str) -> None:
    data, fragment = MALFORMED_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as loader:
        SafetensorsSource(path)
    with pytest.raises(CheckpointError) as inspector:
        describe_checkpoint(path, hashes=False)
    assert fragment in str(loader.value) and "\n" not in str(loader.value)
    assert str(loader.value) in str(inspector.value)  # inspect and the loader agree, word for word
    assert_cli_refuses(capsys, tiny_model, tmp_path, path, fragment)


def test_safetensors_header_past_its_limit_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big-header.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", 17 * 2**20) + b"{")
        handle.truncate(8 + 17 * 2**20)  # sparse: nothing to read, nothing written
    with pytest.raises(CheckpointError, match="header of 17825792 bytes is past the 16 MiB limit"):
        SafetensorsSource(path)


def test_safetensors_gaps_and_empty_tensors_load(tmp_path: Path) -> None:
    path = tmp_path / "gaps.safetensors"
    header = {"__metadata__": {"format": "pt"}, "a": f32([2], 0, 8), "e": f32([0, 3], 8, 8), "b": f32([1], 12, 16)}
    path.write_bytes(safetensors_bytes(header, FLOATS))
    source = SafetensorsSource(path)
    assert torch.equal(source.get("a"), torch.tensor([1.0, 2.0])) and torch.equal(source.get("b"), torch.tensor([4.0]))
    assert source.get("e").shape == (0, 3) and source.metadata == {"format": "pt"}


# --- 5: the output folder's check (no probe file any more: os.access) ------------------------------------


def test_output_check_never_follows_or_truncates_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outdir = tmp_path / "out"
    outdir.mkdir()
    for name in (f".write-test-{os.getpid()}", ".write-test"):
        (outdir / name).symlink_to(victim)
    check_output_folder(outdir)
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in outdir.iterdir()) == [".write-test", f".write-test-{os.getpid()}"]


# --- the genuine tiny model still runs -------------------------------------------------------------


def test_genuine_tiny_ckpt_generates_after_refusals(tmp_path: Path, capsys, tiny_model) -> None:
    marker = tmp_path / "marker"
    for body, _ in crafted_pickles(marker).values():
        with pytest.raises(CheckpointError):
            load_ckpt(torch_zip(tmp_path / "crafted.ckpt", program(body), {"0": FLOATS}))
    code, _, err = cli(capsys, "txt2img", "--ckpt", tiny_model.ckpt, "--tokenizer", tiny_model.tokenizer,
                       "--outdir", tmp_path / "out", "--H", "64", "--W", "64", "--ddim_steps", "1", "--n_samples", "1",
                       "--device", "cpu", "--skip_grid")
    assert code == 0, err
    assert len(files(tmp_path / "out")) == 1 and not marker.exists()

"""The restricted `.ckpt` loader: real layouts load to the same tensors; unsafe or broken files are refused."""

from __future__ import annotations

import builtins
import os
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from optimized_sd.errors import CheckpointError
from optimized_sd.weights.ckpt import InertLightningObject, load_ckpt, state_dict_from_ckpt

from lightning_checkpoints import lightning_standin, tiny_sd1, write_lightning_ckpt

MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def rewrite_zip(src: Path, dst: Path, patch: dict[str, Callable[[bytes], bytes]]) -> None:
    """Copy a torch zip record by record (stored, uncompressed), transforming records by name suffix."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, fn in patch.items():
                if info.filename.endswith(suffix):
                    data = fn(data)
            zout.writestr(info.filename, data)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# --- layouts that must load ---------------------------------------------------------------------


def test_lightning_ckpt_loads_without_importing_pytorch_lightning(tmp_path: Path) -> None:
    sd = tiny_sd1()
    path = tmp_path / "sd-v1-4-tiny.ckpt"
    write_lightning_ckpt(path, sd)
    with zipfile.ZipFile(path) as zf:
        pickle_bytes = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert b"pytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint" in pickle_bytes
    assert b"numpy" in pickle_bytes

    obj = load_ckpt(path)

    assert "pytorch_lightning" not in sys.modules
    assert obj["epoch"] == 6 and obj["global_step"] == 470000
    assert obj["pytorch-lightning_version"] == "1.4.2"
    (callback_cls, callback_state), = obj["callbacks"].items()
    assert issubclass(callback_cls, InertLightningObject)
    assert callback_cls.lightning_global == MODEL_CHECKPOINT
    assert callback_state["current_score"] == 0.125
    (instance,) = obj["callback_objects"]
    assert isinstance(instance, InertLightningObject)
    assert instance.pickled_state["dirpath"] == "/logs"
    assert instance.pickled_state["extra"]["top_k"] == 3
    assert_same_tensors(state_dict_from_ckpt(obj), sd)


def test_zip_checkpoint_tensors_are_memory_mapped(tmp_path: Path) -> None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    sd = tiny_sd1()
    path = tmp_path / "mapped.ckpt"
    write_lightning_ckpt(path, sd)
    tensor = state_dict_from_ckpt(load_ckpt(path))["model.diffusion_model.out.2.weight"]
    ptr = tensor.data_ptr()
    regions = []
    for line in maps.read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            regions.append((lo, hi))
    assert any(lo <= ptr < hi for lo, hi in regions), "tensor data is not inside the file's mapping"


@pytest.mark.parametrize("layout", ["lightning", "bare", "wrapped", "fp16", "legacy", "safetensors"])
def test_every_layout_loads_the_same_tensors(tmp_path: Path, layout: str) -> None:
    sd = tiny_sd1()
    want = sd
    path = tmp_path / f"{layout}.ckpt"
    if layout == "lightning":
        write_lightning_ckpt(path, sd)
    elif layout == "bare":
        torch.save(sd, path)
    elif layout == "wrapped":
        torch.save({"state_dict": sd}, path)
    elif layout == "fp16":
        want = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
        torch.save(want, path)
    elif layout == "legacy":
        torch.save({"state_dict": sd, "epoch": np.int64(3)}, path, _use_new_zipfile_serialization=False)
    else:
        path = tmp_path / "model.safetensors"
        save_file(sd, path, metadata={"format": "pt"})
        assert_same_tensors(load_file(path), sd)  # the reference reader, for symmetry
        with pytest.raises(CheckpointError, match="safetensors"):
            load_ckpt(path)
        return
    got = state_dict_from_ckpt(load_ckpt(path))
    assert_same_tensors(got, want)
    if layout == "fp16":
        # same values as the fp32 original, to fp16 precision
        for key, value in sd.items():
            torch.testing.assert_close(got[key].to(value.dtype), value, atol=1e-2, rtol=1e-2)


def test_numpy1_module_names_load_without_numpy_core_warning(tmp_path: Path) -> None:
    """Files written under numpy 1 name `numpy.core.multiarray.scalar`; numpy 2 calls it `numpy._core`."""
    src = tmp_path / "np2.ckpt"
    dst = tmp_path / "np1.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": np.int64(470000),
                "score": np.float32(0.5)}, src)
    rewrite_zip(src, dst, {"data.pkl": lambda b: b.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")})
    with zipfile.ZipFile(dst) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray\nscalar" in data

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        obj = load_ckpt(dst)
    assert obj["global_step"] == 470000 and obj["score"] == np.float32(0.5)


def test_state_dict_from_ckpt_unwraps_filters_and_converts_numpy_scalars() -> None:
    w = torch.ones(3)
    param = torch.nn.Parameter(torch.zeros(2))
    obj = {"state_dict": {"w": w, "p": param, "step": np.int64(7), "lr": np.float32(0.5),
                          "name": "not a tensor", "n": 3}, "epoch": 1}
    sd = state_dict_from_ckpt(obj)
    assert set(sd) == {"w", "p", "step", "lr"}
    assert sd["w"] is w
    assert type(sd["p"]) is torch.Tensor and sd["p"].data_ptr() == param.data_ptr()
    assert sd["step"].dtype == torch.int64 and sd["step"].item() == 7 and sd["step"].dim() == 0
    assert sd["lr"].dtype == torch.float32 and sd["lr"].item() == 0.5
    # a bare dict passes through unwrapped
    assert set(state_dict_from_ckpt({"a": w})) == {"a"}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([torch.ones(1)], "list, not a dict of tensors"),
        ({"state_dict": [torch.ones(1)]}, "'state_dict' is a list"),
        ({"epoch": 1, "name": "x"}, "no tensors"),
        ({0: torch.ones(1)}, "non-string key"),
    ],
)
def test_state_dict_from_ckpt_rejects_non_state_dicts(obj: object, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as exc:
        state_dict_from_ckpt(obj)
    assert_one_line(exc)


# --- files that must be refused ----------------------------------------------------------------


class _Payload:
    """Pickles as `func(*args)`: what a malicious checkpoint does."""

    def __init__(self, func: Callable, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, tuple[_Payload, str]]:
    return {
        "os.system": (_Payload(os.system, (f"touch {marker}",)), f"{os.system.__module__}.system"),
        "open": (_Payload(builtins.open, (str(marker), "w")), f"{builtins.open.__module__}.open"),
        # protocol 2 (torch.save's) writes builtins under their Python 2 name
        "exec": (_Payload(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)), "__builtin__.exec"),
    }


@pytest.mark.parametrize("payload", ["os.system", "open", "exec"])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, payload: str, fmt: str) -> None:
    marker = tmp_path / "pwned"
    evil, global_name = _payloads(marker)[payload]
    path = tmp_path / "evil.ckpt"
    # hidden next to real weights, inside Lightning-style nesting
    obj = {"state_dict": tiny_sd1(), "callbacks": {"x": {"state": [evil]}}}
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    assert not marker.exists()

    with pytest.raises(CheckpointError) as exc:
        load_ckpt(path)

    message = assert_one_line(exc)
    assert f"'{global_name}'" in message
    assert "nothing in the file was run" in message
    assert str(path) in message
    assert not marker.exists()


def test_lightning_lookalike_outside_callbacks_is_refused(tmp_path: Path) -> None:
    """Only Lightning's callback/AttributeDict classes become placeholders, not any pytorch_lightning name."""
    path = tmp_path / "pl.ckpt"
    rewrite_src = tmp_path / "src.ckpt"
    with lightning_standin() as ModelCheckpoint:
        torch.save({"state_dict": {"w": torch.ones(1)}, "cb": ModelCheckpoint()}, rewrite_src)
    rewrite_zip(rewrite_src, path, {"data.pkl": lambda b: b.replace(
        b"pytorch_lightning.callbacks.model_checkpoint", b"pytorch_lightning.core.saving_module_xx")})
    with pytest.raises(CheckpointError, match="pytorch_lightning.core.saving_module_xx.ModelCheckpoint"):
        load_ckpt(path)


def test_zip_that_is_not_a_torch_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "photos.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("holiday/readme.txt", "not weights")
    with pytest.raises(CheckpointError, match="zip archive but not a PyTorch checkpoint") as exc:
        load_ckpt(path)
    assert_one_line(exc)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.ckpt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_ckpt(path)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_file_is_refused(tmp_path: Path, fmt: str, fraction: float) -> None:
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": tiny_sd1()}, full, _use_new_zipfile_serialization=(fmt == "zip"))
    data = full.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError) as exc:
        load_ckpt(cut)
    message = assert_one_line(exc)
    assert "truncated" in message or "corrupt" in message or "unreadable" in message


def test_truncated_tensor_record_is_refused(tmp_path: Path) -> None:
    """A zip whose directory is intact but whose tensor record is short must not read past it."""
    full = tmp_path / "full.ckpt"
    torch.save({"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(4)}, full)
    short = tmp_path / "short.ckpt"
    rewrite_zip(full, short, {"data/0": lambda b: b[:16]})
    with pytest.raises(CheckpointError, match=r"truncated checkpoint: tensor record data/0 needs 256 bytes") as exc:
        load_ckpt(short)
    assert_one_line(exc)


def test_missing_folder_empty_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_ckpt(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_ckpt(tmp_path)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_ckpt(empty)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_ckpt(garbage)
    bad_pickle = tmp_path / "bad.ckpt"
    bad_pickle.write_bytes(b"\x80\x02\x8a\x0a" + b"\xff" * 40)
    with pytest.raises(CheckpointError):
        load_ckpt(bad_pickle)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.ckpt"
    torch.save({"w": torch.ones(1)}, path)
    path.chmod(0)
    try:
        with pytest.raises(CheckpointError, match="cannot read"):
            load_ckpt(path)
    finally:
        path.chmod(0o600)


def test_top_level_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.ckpt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="not a dict of tensors"):
        load_ckpt(path)


def test_allowed_torch_objects_round_trip(tmp_path: Path) -> None:
    """bf16 tensors, Parameters, dtype and Size objects, OrderedDict and set are all allowed globals."""
    from collections import OrderedDict

    sd = OrderedDict(w=torch.randn(2, 3).bfloat16(), p=torch.nn.Parameter(torch.ones(2)))
    path = tmp_path / "misc.ckpt"
    torch.save({"state_dict": sd, "dtype": torch.float16, "size": torch.Size([2, 3]), "tags": {"a"}}, path)
    obj = load_ckpt(path)
    assert obj["dtype"] is torch.float16 and obj["size"] == torch.Size([2, 3]) and obj["tags"] == {"a"}
    assert isinstance(obj["state_dict"], OrderedDict)
    got = state_dict_from_ckpt(obj)
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], sd["w"])
    assert torch.equal(got["p"], torch.ones(2)) and not got["p"].requires_grad

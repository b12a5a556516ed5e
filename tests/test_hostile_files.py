"""Issue 25, loader findings: every file of the hostile corpus (tests/hostile) is refused in one line by every
loader it can reach; the 10**6-deep pickle only in a subprocess (it would kill the process if it got through);
genuine views, nesting and original textual-inversion files still load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli as cli
from hostile import CORPUS, Hostile, deep_tuple_key
from hostile.pickles import FLOATS, program, torch_zip

import optimized_sd.weights.ckpt as ckpt_module
from optimized_sd.config import TINY
from optimized_sd.errors import UserError
from optimized_sd.pipelines.masks import load_mask
from optimized_sd.pipelines.output import read_parameters
from optimized_sd.weights.ckpt import load_ckpt
from optimized_sd.weights.embeddings import read_embedding
from optimized_sd.weights.inspect import describe_checkpoint
from optimized_sd.weights.loading import open_weight_file
from optimized_sd.weights.lora import read_lora

ROOT = Path(__file__).resolve().parents[1]
LOADERS = {
    "inspect": lambda path: describe_checkpoint(path, hashes=False),
    "checkpoint": open_weight_file,
    "embedding": read_embedding,
    "lora": lambda path: read_lora(path, TINY, {}),
}


def assert_one_line(message: str, path: Path, refusal: str, where: str = "") -> None:
    assert "\n" not in message and refusal in message and path.name in message, (where, message)


@pytest.mark.parametrize("entry", CORPUS, ids=lambda entry: entry.name)
def test_hostile_file_is_refused_in_one_line_by_every_loader(tmp_path: Path, capsys, entry: Hostile) -> None:
    path = entry.write(tmp_path)
    for name, load in LOADERS.items():
        with pytest.raises(UserError) as refused:
            load(path)
        assert_one_line(str(refused.value), path, entry.refusal, name)
    code, _, err = cli(capsys, "inspect", path)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert_one_line(err.strip(), path, entry.refusal)


LOAD_EACH = """
import sys
from pathlib import Path
from optimized_sd.config import TINY
from optimized_sd.errors import UserError
from optimized_sd.weights.embeddings import read_embedding
from optimized_sd.weights.loading import open_weight_file
from optimized_sd.weights.lora import read_lora
for load in (open_weight_file, read_embedding, lambda path: read_lora(path, TINY, {})):
    try:
        load(Path(sys.argv[1]))
    except UserError as error:
        print(error)
"""


def test_million_deep_pickle_is_refused_not_a_crash(tmp_path: Path) -> None:
    """The issue's 1 MB file: a tuple nested 10**6 deep as a dict key segfaulted `inspect`, embeddings and LoRAs."""
    path = tmp_path / "deep.pt"
    path.write_bytes(deep_tuple_key(10**6))
    assert path.stat().st_size < 2**21
    done = subprocess.run([sys.executable, "-m", "optimized_sd.cli", "inspect", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert_one_line(done.stderr.strip(), path, "its pickle nests too deeply")
    done = subprocess.run([sys.executable, "-c", LOAD_EACH, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all("its pickle nests too deeply" in line for line in lines), done.stdout


def txt2img(capsys, tiny_model, tmp_path: Path, prompt: str, *flags: object) -> tuple[int, str]:
    code, _, err = cli(capsys, "txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--device", "cpu",
                       "--H", "64", "--W", "64", "--ddim_steps", "1", "--n_samples", "1", "--skip_grid",
                       "--outdir", tmp_path / "out", "--prompt", prompt, *flags)
    return code, err


def test_hostile_embedding_and_lora_named_in_a_prompt_fail_in_one_line(tmp_path: Path, capsys, tiny_model) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    path = CORPUS[0].write(folder, "hostile")
    for prompt, flags in (("a hostile cube", ["--embeddings-dir", folder]), ("a cube <lora:hostile>", ["--lora-dir", folder])):
        code, err = txt2img(capsys, tiny_model, tmp_path, prompt, *flags)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        assert_one_line(err.strip(), path, CORPUS[0].refusal)
    assert not list((tmp_path / "out").rglob("*.png"))


def original_textual_inversion(path: Path, vectors: torch.Tensor) -> Path:
    """What the original textual-inversion code (and AUTOMATIC1111 before safetensors) saved."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)}),
                "name": path.stem, "step": 3000, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}, path)
    return path


def test_original_textual_inversion_file_loads_inertly(tmp_path: Path, monkeypatch, capsys, tiny_model) -> None:
    vectors = torch.randn(2, 64)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    path = original_textual_inversion(folder / "shiny.pt", vectors)

    def no_module_code(*args: object, **kwargs: object) -> None:
        raise AssertionError("module code ran while loading")

    for method in ("__init__", "__setstate__", "__setattr__"):
        monkeypatch.setattr(torch.nn.Module, method, no_module_code)
    monkeypatch.setattr(torch.nn.ParameterDict, "__init__", no_module_code)
    embedding = read_embedding(path)
    assert embedding.name == "shiny" and torch.equal(embedding.for_towers((64,))[0], vectors)
    assert set(load_ckpt(path)) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    monkeypatch.undo()
    code, err = txt2img(capsys, tiny_model, tmp_path, "a shiny cube", "--embeddings-dir", folder)
    assert code == 0, err
    (image,) = (tmp_path / "out").rglob("*.png")
    assert 'TI hashes: "shiny: ' in read_parameters(image)


def test_genuine_views_still_load(tmp_path: Path) -> None:
    """What torch.save writes for real views: size-1 dims with stride 0 (transformers' position_ids), transposes,
    stepped slices, offsets into a shared storage, empty tensors; only a dim of size > 1 may not alias."""
    base = torch.arange(24, dtype=torch.float32)
    views = {"position_ids": torch.arange(7).expand(1, -1), "transposed": base.view(4, 6).t(), "stepped": base.view(4, 6)[:, ::2],
             "offset": base[5:17].view(3, 4), "empty": base[24:], "scalar": base[3], "column": base.view(6, 4)[:, 1:2]}
    torch.save(views, tmp_path / "views.pt")
    got = load_ckpt(tmp_path / "views.pt")
    for key, view in views.items():
        assert torch.equal(got[key], view), key
    torch.save({"expanded": torch.zeros(6)[:3].expand(2, 3)}, tmp_path / "expanded.pt")
    with pytest.raises(UserError, match=r"size \(2, 3\) with stride \(0, 1\), whose elements overlap"):
        load_ckpt(tmp_path / "expanded.pt")


def test_nesting_below_the_bound_loads(tmp_path: Path) -> None:
    import pickle

    depth = ckpt_module.PICKLE_LIMIT_NESTING - 2  # inside the top-level dict
    path = torch_zip(tmp_path / "nested.pt", program(pickle.EMPTY_DICT + pickle.BINUNICODE + b"\x01\x00\x00\x00x"
                                                     + pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth + pickle.SETITEM), {"0": FLOATS})
    value = load_ckpt(path)["x"]
    for _ in range(depth):
        (value,) = value
    assert value == ()


def test_nesting_table_forgets_dropped_containers() -> None:
    """A pickle that builds and drops nested containers (4 opcodes each) must not keep them all alive."""
    nesting = ckpt_module._Nesting()
    for _ in range(70_000):
        nesting.built([], [[]])
    assert len(nesting._known) <= 2**16 + 2


def test_hostile_images_given_as_masks_are_refused_in_one_line(tmp_path: Path) -> None:
    """Found by fuzzing masks: a broken PNG chunk (PIL raises SyntaxError) escaped as a traceback; masks now take the
    init image's checks (any decoder failure, the pixel limit read from the header, FIFOs)."""
    from test_hardening_io import init_image_cases

    for name, (path, flags, fragment) in init_image_cases(tmp_path).items():
        if flags:
            continue  # cases about the --max-image-pixels flag of img2img
        with pytest.raises(UserError) as refused:
            load_mask(path)
        message = str(refused.value)
        assert "\n" not in message and fragment.replace("init image", "mask") in message, (name, message)


def test_module_state_dict_with_metadata_loads(tmp_path: Path) -> None:
    """`Module.state_dict()` (what Lightning and most .pt/.ckpt files hold) is an OrderedDict carrying `_metadata`
    as an attribute, pickled as BUILD on the OrderedDict: it was refused; the state is now dropped, the tensors kept."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    expected = model.state_dict()
    assert hasattr(expected, "_metadata")
    torch.save({"state_dict": expected, "epoch": 1}, tmp_path / "lightning.ckpt")
    torch.save(expected, tmp_path / "bare.pt", _use_new_zipfile_serialization=False)
    for got in (load_ckpt(tmp_path / "lightning.ckpt")["state_dict"], load_ckpt(tmp_path / "bare.pt")):
        assert list(got) == list(expected) and all(torch.equal(got[k], v) for k, v in expected.items())

"""Hardening of requests (issue 25, third round): every numeric field has a finite range checked once
(`pipelines.bounds`), named by the CLI's flag or the batch file's line and field; masks are read as init
images are (regular files only, any PIL failure one line); a batch line cannot plan unbounded work; a
tampered manifest cannot mark an image done; NaN/inf from the model fails the run instead of saving black."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_cli as run
from PIL import Image
from safetensors.torch import load_file, save_file

from optimized_sd.batch import read_jobs, run_batch
from optimized_sd.batch.driver import BatchReport, WorkerLost, plan
from optimized_sd.batch.manifest import MANIFEST, Manifest, ManifestRecord
from optimized_sd.batch.worker import RenderedImage
from optimized_sd.cli import flag_words
from optimized_sd.errors import FieldError, UserError
from optimized_sd.pipelines import bounds
from optimized_sd.pipelines.bounds import MAX_IMAGES_PER_JOB, NUMBER_BOUNDS, check_number
from optimized_sd.pipelines.job import Job
from optimized_sd.pipelines.masks import InpaintOptions, blur_mask, load_mask
from optimized_sd.pipelines.output import encode
from tests.test_hardening_io import assert_one_line_error, unknown_dds

DEFAULTS = Job(steps=2, sampler="euler", height=64, width=64, seed=5)


@pytest.fixture
def base(tiny_model, tmp_path):
    return [
        "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path / "out",
        "--H", "64", "--W", "64", "--ddim_steps", "1", "--n_samples", "1", "--device", "cpu", "--seed", "5", "--sampler", "ddim",
    ]  # fmt: skip


@pytest.fixture
def inpaint_files(tmp_path) -> tuple[Path, Path]:
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (120, 60, 30)).save(init)
    square = Image.new("L", (64, 64), 0)
    square.paste(255, (16, 16, 48, 48))
    square.save(mask)
    return init, mask


def assert_fails_after_sampling(code: int, err: str, message: str) -> None:
    """Exit 1 and one `error:` line after the progress bars of the sampling that ran; no traceback."""
    assert code == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1].split("\r")[-1].strip()
    assert last.startswith("error: ") and message in last, err


def written(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- one table of ranges --------------------------------------------------------------------------


@pytest.mark.parametrize("field", sorted(NUMBER_BOUNDS))
def test_every_bounded_field_refuses_nan_inf_and_both_sides(field):
    bound = NUMBER_BOUNDS[field]
    step = 1 if bound.whole else 0.5
    check_number(field, bound.low)
    check_number(field, bound.high)
    bad = [bound.low - step, bound.high + step, 10**400]
    if not bound.whole:
        bad += [math.nan, math.inf, -math.inf, 1e308]
    for value in bad:
        with pytest.raises(FieldError) as refused:
            check_number(field, value)
        assert refused.value.field == field and str(refused.value).startswith(f"{field} "), value
        assert "\n" not in str(refused.value) and len(str(refused.value)) < 200  # 10**400 is not quoted in full
    if bound.whole:
        with pytest.raises(FieldError, match="whole number"):
            check_number(field, 2.5)
    with pytest.raises(FieldError):
        check_number(field, True)


def test_field_error_names_the_field_in_each_front_ends_words():
    with pytest.raises(FieldError) as refused:
        check_number("scale", 1e308)
    assert str(refused.value) == "scale must be from -1000 to 1000, got 1e+308"  # the library names the request field
    assert flag_words(refused.value) == "--scale must be from -1000 to 1000, got 1e+308"
    assert refused.value.named("cfg_scale") == "cfg_scale must be from -1000 to 1000, got 1e+308"


CLI_CASES = {
    "scale 1e308": ("txt2img", ["--scale", "1e308"], "--scale must be from -1000 to 1000, got 1e+308"),
    "steps 10^6": ("txt2img", ["--ddim_steps", "1000000"], "--ddim_steps must be at least 1 (at most 1000)"),
    "n_samples 10^8": ("txt2img", ["--n_samples", "100000000"], "--n_samples must be at least 1 (at most 64)"),
    "n_iter 10^8": ("txt2img", ["--n_iter", "100000000"], "--n_iter must be at least 1 (at most 10000)"),
    "images per job": ("txt2img", ["--n_samples", "64", "--n_iter", "1000"], f"over the limit of {MAX_IMAGES_PER_JOB} per job"),
    "mask blur 1e10": ("inpaint", ["--mask-blur", "1e10"], "--mask-blur must be 0 or more (at most 10000), got 10000000000.0"),
    "mask blur 1e30": ("inpaint", ["--mask-blur", "1e30"], "--mask-blur must be 0 or more"),
    "mask blur nan": ("inpaint", ["--mask-blur", "nan"], "--mask-blur must be a finite number, not nan"),
    "mask blur inf": ("inpaint", ["--mask-blur", "inf"], "--mask-blur must be a finite number, not inf"),
    "padding 10^9": ("inpaint", ["--padding", "1000000000"], "--padding must be 0 or more (at most 10000)"),
    "outpaint 10^6": ("inpaint", ["--outpaint", "0,1000000,0,0"], "--outpaint must be 0 or more (at most 2048)"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_out_of_range_numbers_in_one_line(capsys, base, tmp_path, inpaint_files, case):
    command, extra, message = CLI_CASES[case]
    if command == "inpaint":
        init, mask = inpaint_files
        extra = ["--init-img", init, "--mask", mask, *extra]
    code, _, err = run(capsys, command, *base, *extra)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_blur_is_clamped_to_the_diagonal():
    """Defence in depth: a radius past the diagonal blurs as the diagonal does (Pillow is never given more)."""
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (10, 10, 30, 30))
    diagonal = math.hypot(64, 48)
    assert np.array_equal(np.asarray(blur_mask(mask, 9999)), np.asarray(blur_mask(mask, diagonal)))
    for radius in (math.nan, math.inf, 1e30):
        with pytest.raises(FieldError):
            blur_mask(mask, radius)


# -- batch lines ----------------------------------------------------------------------------------


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "scale": NaN}', "line 2: field 'scale' must be a finite number, not nan"),
        ({"prompt": "a", "scale": 1e308}, "line 2: field 'scale' must be from -1000 to 1000"),
        ({"prompt": "a", "init_image": "i.png", "mask": "m.png", "mask_blur": 1e10}, "line 2: field 'mask_blur' must be 0 or more"),
        ({"prompt": "a", "init_image": "i.png", "mask": "m.png", "padding": 10**9}, "line 2: field 'padding' must be 0 or more"),
        ({"prompt": "a", "n_samples": 10**8, "n_iter": 10**8}, "line 2: field 'n_samples' must be at least 1 (at most 64)"),
        ({"prompt": "a", "n_samples": 64, "n_iter": 10**8}, "line 2: field 'n_iter' must be at least 1 (at most 10000)"),
        ({"prompt": "a", "n_samples": 64, "n_iter": 1000}, "line 2: n_samples x n_iter = 64 x 1000 = 64000 images, over the limit"),
        ({"prompt": "a", "seed": 2**64}, "line 2: field 'seed' must be between 0 and 2^64-1 (18446744073709551615), got 1844"),
        ({"prompt": "a", "steps": 10**9}, "line 2: field 'steps' must be at least 1 (at most 1000)"),
    ],
)
def test_a_batch_line_out_of_range_is_named_by_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "jobs.jsonl", {"prompt": "fine"}, line)
    with pytest.raises(UserError, match=re.escape(message)):
        read_jobs(path, DEFAULTS)


def test_a_value_from_the_command_line_is_named_by_its_flag(tmp_path):
    path = write_lines(tmp_path / "jobs.jsonl", {"prompt": "fine"})
    with pytest.raises(FieldError, match="line 1: scale must be from") as refused:
        read_jobs(path, Job(scale=1e308))
    assert flag_words(refused.value).startswith(f"{path} line 1: --scale must be from")


class NoPool:
    """A pool that must never be started: every line fails before any image is planned."""

    def __init__(self) -> None:
        self.closed = False

    def start(self) -> None:
        raise AssertionError("the model would load")

    def close(self) -> None:
        self.closed = True


def test_a_lines_images_are_planned_lazily(tmp_path):
    (job,) = read_jobs(write_lines(tmp_path / "jobs.jsonl", {"prompt": "a", "n_samples": 2, "n_iter": MAX_IMAGES_PER_JOB // 2}), DEFAULTS)
    items, total = plan([job] * 1000, Manifest(tmp_path), BatchReport())  # ten million images: none made yet
    assert isinstance(items, Iterator) and total == 1000 * MAX_IMAGES_PER_JOB
    first, second = next(items), next(items)
    assert (first.position, first.index, first.seed, second.seed) == (0, 0, 5, 6)


class FlakyPool:
    """Two slots finishing last-in first-out (out of plan order); the first worker to finish dies once."""

    def __init__(self) -> None:
        self.running: list = []
        self.lost = False

    def start(self) -> None:
        pass

    def free_slots(self) -> int:
        return 2 - len(self.running)

    def in_flight(self) -> int:
        return len(self.running)

    def submit(self, item) -> None:
        self.running.append(item)

    def wait(self) -> list:
        item = self.running.pop()
        if not self.lost:
            self.lost = True
            return [(item, WorkerLost("killed"))]
        data = encode(Image.new("RGB", (8, 8), (item.seed, 0, 0)), "png", "")
        return [(item, RenderedImage(data, "", "w", "cpu", 0.0, 0.0, 0.0))]

    def close(self) -> None:
        pass


def test_lazily_planned_items_are_retried_and_written_in_plan_order(tmp_path):
    lines = write_lines(tmp_path / "jobs.jsonl", {"prompt": "a", "n_samples": 2, "n_iter": 2}, {"prompt": "b", "n_samples": 2})
    jobs = read_jobs(lines, DEFAULTS)
    report = run_batch(jobs, tmp_path / "out", FlakyPool())  # type: ignore[arg-type]
    assert not report.failures
    assert [(r.line, r.index, r.seed) for r in report.written] == [(1, 0, 5), (1, 1, 6), (1, 2, 7), (1, 3, 8), (2, 0, 5), (2, 1, 6)]
    assert len((tmp_path / "out" / MANIFEST).read_text().splitlines()) == 6
    again = run_batch(jobs, tmp_path / "out", NoPool())  # type: ignore[arg-type]
    assert again.skipped == 6 and not again.written


@pytest.mark.parametrize("kind", ["FIFO", "character device", "DDS"])
def test_an_unreadable_mask_fails_its_line_once_and_nothing_loads(tmp_path, inpaint_files, kind):
    init, _ = inpaint_files
    if kind == "FIFO":
        mask = tmp_path / "pipe.png"
        os.mkfifo(mask)
        message = f"mask {mask} is a FIFO, not a regular file"
    elif kind == "character device":
        mask, message = Path("/dev/zero"), "mask /dev/zero is a character device, not a regular file"
    else:
        mask = tmp_path / "mask.dds"
        unknown_dds(mask)
        message = f"mask {mask} is not a readable image"
    line = {"prompt": "a", "init_image": str(init), "mask": str(mask), "n_samples": 3, "n_iter": 2}
    jobs = read_jobs(write_lines(tmp_path / "jobs.jsonl", line), DEFAULTS)
    pool = NoPool()
    report = run_batch(jobs, tmp_path / "out", pool)  # type: ignore[arg-type]
    assert len(report.failures) == 1 and report.failures[0][:2] == (1, None), report.failures
    assert report.failures[0][2].startswith(message) and "\n" not in report.failures[0][2]
    assert pool.closed and not written(tmp_path / "out")


# -- masks as files ---------------------------------------------------------------------------------


def test_a_fifo_mask_is_refused_without_blocking(capsys, base, tmp_path, inpaint_files):
    init, _ = inpaint_files
    fifo = tmp_path / "mask-pipe.png"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    code, _, err = run(capsys, "inpaint", *base, "--init-img", init, "--mask", fifo)
    assert_one_line_error(code, err, f"mask {fifo} is a FIFO, not a regular file")
    assert not (tmp_path / "out").exists()


def test_a_dds_mask_is_one_line(capsys, base, tmp_path, inpaint_files):
    init, _ = inpaint_files
    dds = tmp_path / "mask.dds"
    unknown_dds(dds)  # PIL opens the header, then raises NotImplementedError decoding it
    code, _, err = run(capsys, "inpaint", *base, "--init-img", init, "--mask", dds)
    assert_one_line_error(code, err, f"mask {dds} is not a readable image")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("raised", [NotImplementedError("no decoder"), struct.error("unpack"), EOFError(), SyntaxError("bad chunk"),
                                    ValueError("odd"), OSError("truncated"), Image.DecompressionBombError("huge")])  # fmt: skip
def test_any_pil_failure_on_a_mask_is_a_user_error(tmp_path, monkeypatch, raised):
    path = tmp_path / "mask.png"
    Image.new("L", (8, 8), 255).save(path)

    def failing_open(*args, **kwargs):
        raise raised

    monkeypatch.setattr(Image, "open", failing_open)
    with pytest.raises(UserError, match=f"mask {path}") as refused:
        load_mask(path)
    assert "\n" not in str(refused.value)


def test_inpaint_options_bound_their_numbers():
    with pytest.raises(FieldError, match="outpaint must be 0 or more"):
        InpaintOptions(outpaint=(0, 5000, 0, 0)).check()
    with pytest.raises(FieldError, match="mask_blur must be a finite number"):
        InpaintOptions(mask="m.png", mask_blur=math.nan).check()


# -- the manifest -----------------------------------------------------------------------------------


def record(file: str, index: int = 0) -> ManifestRecord:
    return ManifestRecord(1, "key", index, 5 + index, 5, "a", file, "w", "cpu", 0.1, 0.0, 1.0)


def test_a_manifest_record_outside_the_output_folder_is_not_done(tmp_path, caplog):
    outdir = tmp_path / "out"
    outdir.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    (outdir / "a").mkdir()
    (outdir / "a" / "inside.png").write_bytes(b"png")
    (outdir / "a" / "link.png").symlink_to(outside)
    lines = [record("../secret.png", 0), record(str(outside), 1), record("a/link.png", 2), record("a/inside.png", 3)]
    (outdir / MANIFEST).write_text("".join(json.dumps(r.__dict__) + "\n" for r in lines))
    with caplog.at_level("WARNING", logger="optimized_sd"):
        done = Manifest(outdir).done()
    assert sorted(index for _, index in done) == [3]
    assert caplog.text.count("not a file in the output folder") == 3
    assert outside.read_bytes() == b"not yours"


def test_an_append_after_a_last_line_without_newline_starts_a_new_line(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps(record("a/0.png").__dict__))  # complete, but no "\n" (edited by hand)
    manifest = Manifest(tmp_path)
    manifest.append(record("a/1.png", 1))
    reread = Manifest(tmp_path)
    assert [r.file for r in reread.records] == ["a/0.png", "a/1.png"]


# -- non-finite output ------------------------------------------------------------------------------


@pytest.fixture
def nan_model(tiny_model, tmp_path) -> Path:
    """The tiny model with one NaN in the UNet's output convolution: every sampling step gives NaN."""
    tensors = load_file(str(tiny_model.safetensors))
    key = "model.diffusion_model.out.2.weight"
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = math.nan
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    return path


def test_a_model_that_samples_nan_fails_and_writes_nothing(capsys, base, tmp_path, nan_model):
    args = [*base, "--ckpt", nan_model]  # the later --ckpt wins
    code, _, err = run(capsys, "txt2img", *args)
    assert_fails_after_sampling(code, err, "sampling produced non-finite latents (NaN/inf)")
    assert not written(tmp_path / "out")


def test_a_vae_that_decodes_nan_fails_and_writes_nothing(capsys, base, tmp_path, monkeypatch):
    from optimized_sd.pipelines import core

    real = core.apply_vae

    def nan_pixels(*args, **kwargs):
        return torch.full_like(real(*args, **kwargs), math.nan)

    monkeypatch.setattr(core, "apply_vae", nan_pixels)
    code, _, err = run(capsys, "txt2img", *base)
    assert_fails_after_sampling(code, err, "VAE decoding produced non-finite pixels (NaN/inf)")
    assert not written(tmp_path / "out")


def test_bounds_table_is_what_the_readme_states():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for value in (bounds.MAX_SCALE, bounds.MAX_MASK_BLUR, bounds.MAX_SAMPLES, bounds.MAX_IMAGES_PER_JOB, bounds.MAX_OUTPAINT):
        assert f"{value:,g}" in readme or f"{value:g}" in readme, value

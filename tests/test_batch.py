"""The batch driver: job files checked line by line before any work, per-image seeds, files equal to a
serial run, a manifest that makes a re-run complete only what is missing, and failures that stay alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from optimized_sd.batch import BatchWorker, LoadSpec, LocalPool, read_jobs, run_batch
from optimized_sd.batch.manifest import MANIFEST
from optimized_sd.cli import main
from optimized_sd.errors import Interrupted, UserError
from optimized_sd.pipelines.controlnet import ControlNetSpec
from optimized_sd.pipelines.job import Job, OutputPolicy
from optimized_sd.pipelines.load_options import LoadOptions
from optimized_sd.pipelines.output import read_parameters

DEFAULTS = Job(prompts=("default prompt",), steps=2, sampler="euler", height=64, width=64, seed=5, output=OutputPolicy(Path("unused")))


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def images(folder: Path) -> dict[str, bytes]:
    """Relative image path -> file bytes (the manifest and anything hidden left out)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).tobytes()


def test_fields_take_the_command_lines_values_when_omitted(tmp_path):
    jobs = read_jobs(
        write_lines(tmp_path / "j.jsonl", {"prompt": "a cat", "n_samples": 3, "size": "128x64"}, "", {"seed": 1, "scale": 2}), DEFAULTS
    )
    assert [job.line for job in jobs] == [1, 3]
    first, second = (job.job for job in jobs)
    assert first.prompts == ("a cat",) and first.n_samples == 3 and (first.width, first.height) == (128, 64) and first.seed == 5
    assert second.prompts == ("default prompt",) and second.seed == 1 and second.scale == 2.0 and second.steps == 2
    assert [jobs[0].seed_of(5, i) for i in range(3)] == [5, 6, 7]


def test_a_plain_file_is_one_prompt_per_line(tmp_path):
    jobs = read_jobs(write_lines(tmp_path / "prompts.txt", "a red cube", "", "  a blue ball "), DEFAULTS)
    assert [(job.line, job.prompt) for job in jobs] == [(1, "a red cube"), (3, "a blue ball")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", ', "line 2: not valid JSON"),
        ({"prompt": "a", "colour": "red"}, "line 2: unknown field 'colour'"),
        ({"prompt": "a", "steps": "many"}, "line 2: field 'steps' must be an integer"),
        ({"prompt": "a", "mask": "m.png"}, "line 2: inpainting needs an init image"),
        ({"prompt": "a", "loras": {"gone.safetensors": 0.5}}, "line 2: field 'loras' gone.safetensors: no such file"),
        ({"prompt": "a", "loras": "x"}, "line 2: field 'loras' must be a list"),
        ({"prompt": "a", "init_image": "i.png", "mask": "m.png", "inpaint_area": "most"}, "line 2: field 'inpaint_area' 'most' is unknown"),
        ({"prompt": "a", "init_image": "i.png", "outpaint": [1, 2]}, "line 2: field 'outpaint' must be"),
        ({"prompt": "a", "sampler": "nope"}, "line 2: field 'sampler' 'nope' is unknown"),
        ({"prompt": "a", "size": "65x64"}, "line 2: field 'size' 65 is not a multiple of 8"),
        ('["a"]', "line 2: a line must be a JSON object"),
    ],
)
def test_a_bad_line_is_named_before_any_work(tmp_path, line, message):
    path = write_lines(tmp_path / "jobs.jsonl", {"prompt": "fine"}, line)
    with pytest.raises(UserError, match=message):
        read_jobs(path, DEFAULTS)


def test_lora_and_inpaint_fields_become_the_jobs_options(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"")
    record = {"prompt": "a", "loras": {str(tmp_path / "style.safetensors"): 0.5}, "init_image": "i.png", "mask": "m.png",
              "mask_blur": 2, "inpaint_area": "masked", "outpaint": "0,64,0,0", "schedule": "karras", "sampler": "euler"}  # fmt: skip
    (job,) = read_jobs(write_lines(tmp_path / "j.jsonl", record), DEFAULTS)
    assert job.job.loras == (f"{tmp_path / 'style.safetensors'}:0.5",) and job.job.schedule == "karras"
    inpaint = job.job.inpaint
    got = (inpaint.mask, inpaint.mask_blur, inpaint.area, inpaint.outpaint, inpaint.padding)
    assert got == (Path("m.png"), 2.0, "masked", (0, 64, 0, 0), 32)


def test_controlnets_become_the_jobs_units_and_bad_values_name_line_and_field(tmp_path):
    for name in ("cn.safetensors", "edges.png"):
        (tmp_path / name).write_bytes(b"")
    unit = {"model": str(tmp_path / "cn.safetensors"), "image": str(tmp_path / "edges.png"), "weight": 0.7, "start": 0.1,
            "end": 0.8, "mode": "prompt", "resize": "fill", "preprocessor": "canny", "threshold_a": 50, "threshold_b": 150}  # fmt: skip
    (job,) = read_jobs(write_lines(tmp_path / "j.jsonl", {"prompt": "a", "controlnets": [unit]}), DEFAULTS)
    expected = ControlNetSpec(tmp_path / "cn.safetensors", tmp_path / "edges.png", 0.7, 0.1, 0.8, "prompt", "fill", "canny", 50, 150)
    assert job.job.controlnets == (expected,)
    short = {"controlnets": [{"file": f"{unit['model']}:0.4", "image": unit["image"]}]}
    (plain,) = read_jobs(write_lines(tmp_path / "k.jsonl", short), DEFAULTS)
    assert plain.job.controlnets == (ControlNetSpec(tmp_path / "cn.safetensors", tmp_path / "edges.png", 0.4),)
    for bad, message in [
        ({**unit, "weight": 11}, r"line 2: field 'controlnets' 0: weight 11 is outside"),
        ({**unit, "mode": "loud"}, r"line 2: field 'controlnets' 0: mode 'loud' is unknown"),
        ({**unit, "start": "early"}, r"line 2: field 'controlnets' must be a list of unit objects whose 'start' is a number"),
        ({**unit, "colour": 1}, r"line 2: field 'controlnets' must be .* \(not 'colour'\)"),
        ({"image": unit["image"]}, r"line 2: field 'controlnets' must be a list of objects"),
        ({**unit, "model": str(tmp_path / "gone.safetensors")}, r"line 2: field 'controlnets' 0: .*gone.safetensors: no such ControlNet"),
    ]:
        with pytest.raises(UserError, match=message):
            read_jobs(write_lines(tmp_path / "bad.jsonl", {"prompt": "fine"}, {"prompt": "a", "controlnets": [bad]}), DEFAULTS)


@pytest.fixture(scope="module")
def spec(tiny_model) -> LoadSpec:
    return LoadSpec(tiny_model.safetensors, LoadOptions(tokenizer=tiny_model.tokenizer, device="cpu"))


@pytest.fixture(scope="module")
def worker(spec) -> Iterator[BatchWorker]:
    """One loaded model for the in-process tests (each pool would otherwise load its own)."""
    loaded = BatchWorker(spec)
    loaded.load()
    yield loaded
    loaded.close()


def cli_flags(tiny_model, outdir: Path) -> list[str]:
    model = ["--ckpt", str(tiny_model.safetensors), "--tokenizer", str(tiny_model.tokenizer), "--device", "cpu"]
    return [*model, "--outdir", str(outdir), "--H", "64", "--W", "64", "--steps", "2", "--sampler", "euler", "--seed", "5"]


def test_each_image_equals_a_txt2img_run_of_its_seed(tiny_model, spec, worker, tmp_path):
    """Image i of a job is rendered alone with seed + i: the pixels and parameters of `txt2img --seed
    seed+i`, under the usual folder and file names, and the manifest says who made it."""
    jobs = read_jobs(
        write_lines(tmp_path / "jobs.jsonl", {"prompt": "a red cube", "n_samples": 2, "seed": 40}, {"prompt": "a blue ball"}), DEFAULTS
    )
    report = run_batch(jobs, tmp_path / "batch", LocalPool(spec, worker))
    assert [(r.line, r.index, r.seed, r.file) for r in report.written] == [
        (1, 0, 40, "a_red_cube/seed_40_00000.png"), (1, 1, 41, "a_red_cube/seed_41_00001.png"), (2, 0, 5, "a_blue_ball/seed_5_00000.png"),
    ]  # fmt: skip
    main(["txt2img", *cli_flags(tiny_model, tmp_path / "single"), "--prompt", "a red cube", "--seed", "41", "--n_samples", "1"])
    single = tmp_path / "single" / "a_red_cube" / "seed_41_00000.png"
    made = tmp_path / "batch" / "a_red_cube" / "seed_41_00001.png"
    assert pixels(made) == pixels(single) and read_parameters(made) == read_parameters(single)
    manifest = [json.loads(line) for line in (tmp_path / "batch" / MANIFEST).read_text().splitlines()]
    assert [m["file"] for m in manifest] == [r.file for r in report.written] and manifest[0]["device"] == "cpu"
    assert manifest[0]["peak_rss_mib"] > 0 and manifest[0]["seconds"] > 0


def test_an_interrupted_batch_resumes_with_only_the_missing_images(tiny_model, spec, worker, tmp_path):
    jobs = read_jobs(
        write_lines(tmp_path / "jobs.jsonl", {"prompt": "a", "n_samples": 3}, {"prompt": "b", "n_samples": 2, "seed": None}), DEFAULTS
    )
    settled = []

    def stop_after_two(step) -> None:
        settled.append(step)
        if len(settled) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_batch(jobs, tmp_path / "resumed", LocalPool(spec, worker), stop_after_two)
    assert len(images(tmp_path / "resumed")) == 2
    report = run_batch(jobs, tmp_path / "resumed", LocalPool(spec, worker))
    assert report.skipped == 2 and [(r.line, r.index) for r in report.written] == [(1, 2), (2, 0), (2, 1)]
    manifest = [json.loads(line) for line in (tmp_path / "resumed" / MANIFEST).read_text().splitlines()]
    assert sorted((m["line"], m["index"]) for m in manifest) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert not [p for p in (tmp_path / "resumed").rglob(".*")]  # no partial file left behind
    again = run_batch(jobs, tmp_path / "resumed", LocalPool(spec, worker))
    assert again.skipped == 5 and not again.written
    random_seed = next(m["base_seed"] for m in manifest if m["line"] == 2)
    fixed = [json.dumps({"prompt": "a", "n_samples": 3}), json.dumps({"prompt": "b", "n_samples": 2, "seed": random_seed})]
    run_batch(read_jobs(write_lines(tmp_path / "fixed.jsonl", *fixed), DEFAULTS), tmp_path / "serial", LocalPool(spec, worker))
    assert images(tmp_path / "resumed") == images(tmp_path / "serial")  # same names, same bytes as one uninterrupted run


def test_a_missing_init_image_fails_alone_and_nothing_is_overwritten(tiny_model, spec, worker, tmp_path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    occupied = tmp_path / "out" / "c" / "seed_5_00000.png"
    occupied.parent.mkdir(parents=True)
    occupied.write_bytes(b"mine")
    lines = [
        {"prompt": "a", "init_image": str(tmp_path / "gone.png")},
        {"prompt": "b", "init_image": str(tmp_path / "red.png"), "strength": 0.5},
        {"prompt": "c"},
    ]
    jobs = read_jobs(write_lines(tmp_path / "jobs.jsonl", *lines), DEFAULTS)
    report = run_batch(jobs, tmp_path / "out", LocalPool(spec, worker))
    assert report.failures == [(1, None, f"init image not found: {tmp_path / 'gone.png'}")]
    assert [r.file for r in report.written] == ["b/seed_5_00000.png", "c/seed_5_00001.png"] and occupied.read_bytes() == b"mine"
    assert "Denoising strength: 0.5" in read_parameters(tmp_path / "out" / "b" / "seed_5_00000.png")


def test_an_inpainting_line_equals_the_inpaint_command(tiny_model, spec, worker, tmp_path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    line = {"prompt": "a cat", "init_image": str(tmp_path / "red.png"), "mask": str(tmp_path / "mask.png"), "mask_blur": 2, "strength": 1.0}
    report = run_batch(read_jobs(write_lines(tmp_path / "jobs.jsonl", line), DEFAULTS), tmp_path / "batch", LocalPool(spec, worker))
    assert not report.failures
    flags = [*cli_flags(tiny_model, tmp_path / "single"), "--prompt", "a cat", "--init-img", str(tmp_path / "red.png")]
    main(["inpaint", *flags, "--mask", str(tmp_path / "mask.png"), "--mask-blur", "2", "--n_samples", "1"])
    made, single = tmp_path / "batch" / "a_cat" / "seed_5_00000.png", tmp_path / "single" / "a_cat" / "seed_5_00000.png"
    assert pixels(made) == pixels(single) and read_parameters(made) == read_parameters(single)


def test_cli_batch_names_the_bad_line_and_lists_failures(tiny_model, tmp_path, capsys):
    bad = write_lines(tmp_path / "bad.jsonl", {"prompt": "a"}, {"prompt": "b", "seeed": 3})
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", str(bad), *cli_flags(tiny_model, tmp_path / "out")])
    assert exit_info.value.code == 1 and f"error: {bad} line 2: unknown field 'seeed'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    jobs = write_lines(tmp_path / "jobs.jsonl", {"prompt": "a", "n_samples": 2}, {"prompt": "b", "init_image": "nowhere.png"})
    with pytest.raises(SystemExit):
        main(["batch", str(jobs), *cli_flags(tiny_model, tmp_path / "out")])
    captured = capsys.readouterr()
    assert "wrote 2 image(s); 0 already in" in captured.out and "failed: line 2: init image not found: nowhere.png" in captured.err


def test_ray_flags_fail_in_one_line_without_ray(tiny_model, tmp_path, capsys, monkeypatch):
    import sys

    jobs = write_lines(tmp_path / "jobs.txt", "a")
    with pytest.raises(SystemExit):
        main(["batch", str(jobs), "--workers", "2", *cli_flags(tiny_model, tmp_path / "out")])
    assert "error: --workers and --gpus-per-worker need --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [ray] extra were not installed
    with pytest.raises(SystemExit):
        main(["batch", str(jobs), "--ray", *cli_flags(tiny_model, tmp_path / "out")])
    assert capsys.readouterr().err.strip() == 'error: --ray needs Ray: pip install "optimized-sd[ray]"'

"""The command line, flag by flag and bad input by bad input, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli as run
from PIL import Image

from optimized_sd.pipelines.output import read_parameters


@pytest.fixture
def base(tiny_model, tmp_path):
    """Flags every generating call needs: the tiny model, its tokenizer, a small fast request."""
    return [
        "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path / "out",
        "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--device", "cpu", "--seed", "5",
    ]


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_txt2img_writes_images_grid_and_metadata(capsys, base, tmp_path):
    code, out, err = run(capsys, "txt2img", *base, "--prompt", "a red:cube", "--n_samples", "2", "--negative-prompt", "blurry", "--sampler", "ddim")
    assert code == 0, err
    written = files(tmp_path / "out")
    names = [p.relative_to(tmp_path / "out").as_posix() for p in written]
    assert names == ["a_red_cube/seed_5_00000.png", "a_red_cube/seed_6_00001.png", "grid_00000.png"]
    text = read_parameters(written[0])
    assert text.splitlines()[0] == "a red:cube"
    assert "Negative prompt: blurry" in text
    assert "Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, Model hash: " in text
    assert "Model: tiny" in text
    assert "seed 5" in out


def test_existing_files_are_never_overwritten(capsys, base, tmp_path):
    assert run(capsys, "txt2img", *base, "--skip_grid")[0] == 0
    first = files(tmp_path / "out")[0]
    before = first.read_bytes()
    assert run(capsys, "txt2img", *base, "--skip_grid", "--prompt", "a painting of a virus monster playing guitar")[0] == 0
    assert first.read_bytes() == before
    assert len(files(tmp_path / "out")) == 2


def test_same_seed_same_image_any_mode(capsys, base, tmp_path):
    """--seed fixes the image; --turbo and --memory stream give the same pixels as full."""
    images = []
    for extra in (["--memory", "full"], ["--turbo"], ["--memory", "stream", "--unet_bs", "1"]):
        outdir = tmp_path / extra[-1]
        assert run(capsys, "txt2img", *base, "--outdir", outdir, "--skip_grid", *extra)[0] == 0
        images.append(Image.open(files(outdir)[0]).tobytes())
    assert images[0] == images[1]


def test_iterations_fixed_code_rows_and_format(capsys, base, tmp_path):
    code, _, err = run(capsys, "txt2img", *base, "--n_iter", "2", "--n_samples", "2", "--fixed_code", "--n_rows", "4", "--format", "jpg")
    assert code == 0, err
    written = files(tmp_path / "out")
    seeds = sorted(p.name.split("_")[1] for p in written if p.name.startswith("seed"))
    assert seeds == ["5", "5", "6", "6"]  # --fixed_code: every batch starts from the same noise
    grid = [p for p in written if p.name.startswith("grid")][0]
    assert Image.open(grid).size == (4 * 66 + 2, 66 + 2)  # 4 per row, 2-pixel gaps
    assert "Seed: 5" in read_parameters([p for p in written if p.suffix == ".jpg"][0])


def test_skip_save_and_skip_grid_write_nothing(capsys, base, tmp_path):
    code, out, _ = run(capsys, "txt2img", *base, "--skip_save", "--skip_grid", "--n_samples", "2")
    assert code == 0 and files(tmp_path / "out") == []
    assert "2 image(s)" in out


def test_from_file_weighted_prompts_and_report(capsys, base, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tabby cat:0.25 white duck:0.75 hybrid\n\nsecond prompt\n")
    report = tmp_path / "report.json"
    code, out, err = run(capsys, "txt2img", *base, "--from-file", prompts, "--skip_grid", "--report", "--report-json", report, "--sampler", "euler_a", "--karras", "--scale", "1", "--precision", "full", "--attention", "sliced", "--vae-tiling", "on")
    assert code == 0, err
    folders = sorted(p.parent.name for p in files(tmp_path / "out"))
    assert folders == ["second_prompt", "tabby_cat_0.25_white_duck_0.75_hybrid"]
    assert "unet" in out and "s/step" in out
    assert set(json.loads(report.read_text())["stages"]) == {"text", "unet", "vae_decode"}
    assert "Sampler: Euler a Karras" in read_parameters(files(tmp_path / "out")[0])


def test_config_override_and_latent_flags(capsys, base, tmp_path, tiny_model):
    from optimized_sd.config import TINY

    config = tmp_path / "tiny.json"
    config.write_text(TINY.to_json())
    code, _, err = run(capsys, "txt2img", *base, "--config", config, "--C", "4", "--f", "8", "--ddim_eta", "0.5", "--sampler", "ddim", "--skip_grid")
    assert code == 0, err
    code, _, err = run(capsys, "txt2img", *base, "--C", "8")
    assert code == 1 and "--C 8: this model's latents have 4 channels" in err


def test_img2img_sizes_strength_and_formats(capsys, base, tmp_path):
    init = tmp_path / "me.jfif"
    Image.new("RGB", (130, 70), (10, 200, 30)).save(init, format="JPEG")
    common = [a for a in base if a not in ("--H", "--W", "64")]
    for strength in ("0", "0.55", "1.0"):
        outdir = tmp_path / f"s{strength}"
        code, _, err = run(capsys, "img2img", *common, "--outdir", outdir, "--init-img", init, "--strength", strength, "--skip_grid", "--sampler", "ddim")
        assert code == 0, err
        image = Image.open(files(outdir)[0])
        assert image.size == (128, 64)  # floored to multiples of 64
        assert "Denoising strength" in read_parameters(files(outdir)[0])
    code, _, err = run(capsys, "img2img", *base, "--init-img", init, "--skip_grid", "--sampler", "euler")
    assert code == 0, err
    assert Image.open(files(tmp_path / "out")[0]).size == (64, 64)  # --H/--W win


def test_long_prompt_is_encoded_in_chunks_not_cut(capsys, base):
    code, _, err = run(capsys, "txt2img", *base, "--prompt", "word " * 90 + "tail", "--skip_save", "--skip_grid")
    assert code == 0
    assert "cut" not in err


def test_inspect_prints_family_and_hash(capsys, tiny_model):
    code, out, err = run(capsys, "inspect", tiny_model.safetensors)
    assert code == 0, err
    assert "sd1" in out.lower() or "SD 1" in out


def test_help_documents_every_flag(capsys):
    code, out, _ = run(capsys, "txt2img", "--help")
    assert code == 0
    for flag in ("--prompt", "--from-file", "--outdir", "--ckpt", "--config", "--tokenizer", "--H", "--W", "--C", "--f", "--ddim_steps", "--scale", "--ddim_eta", "--n_samples", "--n_iter", "--seed", "--device", "--precision", "--format", "--sampler", "--skip_grid", "--skip_save", "--n_rows", "--fixed_code", "--unet_bs", "--turbo", "--negative-prompt", "--memory", "--vram-budget", "--attention", "--vae-tiling", "--report", "--karras"):
        assert flag in out, flag


def bad_inputs(tmp_path: Path, tiny_model) -> dict[str, tuple[list, str]]:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_model.safetensors.read_bytes()[:5000])
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    inpaint = tmp_path / "inpaint.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_model.safetensors))
    weight = tensors["model.diffusion_model.input_blocks.0.0.weight"]
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([weight, weight, weight[:, :1]], dim=1)
    save_file(tensors, str(inpaint))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    not_image = tmp_path / "image.png"
    not_image.write_text("not an image")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should go")
    return {
        "missing checkpoint": (["--ckpt", tmp_path / "none.ckpt"], "checkpoint not found"),
        "truncated checkpoint": (["--ckpt", truncated], "truncated"),
        "not a checkpoint": (["--ckpt", not_ckpt], "not"),
        "unsupported family": (["--ckpt", inpaint], "inpainting"),
        "height not multiple of 8": (["--H", "101"], "--H 101 is not a multiple of 8; the nearest valid size is 104"),
        "width not multiple of 8": (["--W", "63"], "--W 63 is not a multiple of 8; the nearest valid size is 64"),
        "steps below 1": (["--ddim_steps", "0"], "steps"),
        "n_samples below 1": (["--n_samples", "0"], "--n_samples must be at least 1"),
        "prompt file missing": (["--from-file", tmp_path / "nope.txt"], "not found"),
        "prompt file empty": (["--from-file", empty], "holds no prompt"),
        "unknown sampler": (["--sampler", "ddpm"], "--sampler 'ddpm' is unknown; choose one of: ddim, plms"),
        "karras with ddim": (["--sampler", "ddim", "--karras"], "karras"),
        "plms with eta": (["--sampler", "plms", "--ddim_eta", "0.3"], "eta"),
        "unknown device": (["--device", "tpu"], "unknown device 'tpu'"),
        "cuda absent": (["--device", "cuda"], "CUDA is not available"),
        "outdir not writable": (["--outdir", blocker / "sub"], "cannot write to output folder"),
        "unknown memory mode": (["--memory", "fast"], "unknown memory mode 'fast'"),
        "bad budget": (["--vram-budget", "lots"], "cannot read the memory size 'lots'"),
        "unknown attention": (["--attention", "flash9"], "flash9"),
        "xformers missing": (["--attention", "xformers"], "xformers"),
        "unknown format": (["--format", "gif"], "--format 'gif' is unknown"),
        "unknown precision": (["--precision", "fp8"], "unknown precision 'fp8'"),
        "budget below smallest plan": (["--vram-budget", "1KB"], "below the smallest plan"),
    }


BAD_TXT2IMG = [
    "missing checkpoint", "truncated checkpoint", "not a checkpoint", "unsupported family", "height not multiple of 8",
    "width not multiple of 8", "steps below 1", "n_samples below 1", "prompt file missing", "prompt file empty",
    "unknown sampler", "karras with ddim", "plms with eta", "unknown device", "cuda absent", "outdir not writable",
    "unknown memory mode", "bad budget", "unknown attention", "xformers missing", "unknown format", "unknown precision",
    "budget below smallest plan",
]


@pytest.mark.parametrize("case", BAD_TXT2IMG)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(capsys, base, tmp_path, tiny_model, case):
    if case == "cuda absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    extra, message = bad_inputs(tmp_path, tiny_model)[case]
    code, out, err = run(capsys, "txt2img", *base, *extra)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # not even an empty output folder


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strength", "1.5"], "strength"),
        (["--strength", "-0.1"], "strength"),
        (["--init-img", "MISSING"], "init image not found"),
        (["--init-img", "NOTIMAGE"], "is not a readable image"),
    ],
)
def test_img2img_bad_inputs(capsys, base, tmp_path, extra, message):
    init = tmp_path / "ok.png"
    Image.new("RGB", (64, 64)).save(init)
    (tmp_path / "bad.png").write_text("not an image")
    substitutions = {"MISSING": tmp_path / "missing.png", "NOTIMAGE": tmp_path / "bad.png"}
    extra = [substitutions.get(a, a) for a in extra]
    args = ["--init-img", init, *extra] if "--init-img" not in extra else extra
    code, _, err = run(capsys, "img2img", *base, *args)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()

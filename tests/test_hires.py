"""AUTOMATIC1111's hires fix on the tiny model: the second pass is our own img2img from the upscaled
latents (or the upscaled image) with the same seeds; every memory mode gives the same image; the metadata,
the CLI's and the library's refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import optimized_sd
from optimized_sd.errors import FieldError
from optimized_sd.pipelines import core
from optimized_sd.pipelines import img2img as img2img_module
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.hires import UPSCALERS, HiresFix
from optimized_sd.pipelines.job import Job
from optimized_sd.pipelines.memory_session import SAFETY_MARGIN
from optimized_sd.pipelines.txt2img import TXT2IMG
from tests.cli_runs import run_cli

BASE = dict(prompts=["a red cube"], steps=4, sampler="euler", seed=7, height=64, width=64)


def make_pipe(tiny_model, memory: str = "full"):
    return optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", precision="full", memory=memory)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return make_pipe(tiny_model)


def hires_request(**hires) -> GenerationRequest:
    return GenerationRequest(**BASE, hires=HiresFix(**{"steps": 3, "strength": 0.6, **hires}))


@pytest.mark.parametrize("upscaler", ["latent", "latent-bicubic-antialiased", "latent-nearest-exact"])
def test_a_latent_second_pass_is_our_img2img_from_the_interpolated_latents(pipe, monkeypatch, upscaler):
    """The first pass is plain txt2img; the second equals img2img (same seed, strength, steps) whose init
    latents are the first pass' latents through AUTOMATIC1111's interpolate mode."""
    hires = pipe.generate(hires_request(upscaler=upscaler))
    first = pipe.generate(GenerationRequest(**BASE))
    mode = UPSCALERS[upscaler]
    upscaled = F.interpolate(first.latents, size=(16, 16), mode=mode.mode, antialias=mode.antialias)
    monkeypatch.setattr(img2img_module, "encode_image", lambda pipe, image, batch, tiled: upscaled.expand(batch, -1, -1, -1))
    blank = Image.new("RGB", (128, 128))
    reference = pipe.generate(GenerationRequest(**{**BASE, "steps": 3, "height": 128, "width": 128}, init_image=blank, strength=0.6))
    assert hires.latents.shape == (1, 4, 16, 16)
    assert torch.allclose(hires.latents, reference.latents, atol=1e-6)
    assert hires.images[0].size == (128, 128) and hires.seeds == [7]


@pytest.mark.parametrize("name, resample", [("lanczos", Image.Resampling.LANCZOS), ("nearest", Image.Resampling.NEAREST)])
def test_an_image_upscaler_resizes_the_first_image_and_encodes_it_again(pipe, name, resample):
    """The first pass' image resized by PIL (AUTOMATIC1111's None is lanczos too), then plain img2img from it."""
    first = pipe.generate(GenerationRequest(**BASE)).images[0]
    hires = pipe.generate(hires_request(upscaler=name))
    assert "vae_encode" in pipe.meter.summary()  # the second pass encoded the upscaled image
    reference = pipe.generate(GenerationRequest(**{**BASE, "steps": 3}, init_image=first.resize((128, 128), resample), strength=0.6))
    assert torch.allclose(hires.latents, reference.latents, atol=1e-6)
    assert UPSCALERS["none"].resample == Image.Resampling.LANCZOS and not UPSCALERS["none"].latent


@pytest.mark.parametrize("mode", ["stream", pytest.param("turbo", marks=pytest.mark.slow), pytest.param("split", marks=pytest.mark.slow)])
def test_every_memory_mode_makes_full_mode_s_hires_image(tiny_model, pipe, mode):
    reference = pipe.generate(hires_request(scale=1.5)).latents
    assert reference.shape == (1, 4, 12, 12)
    other = make_pipe(tiny_model, memory=mode)
    assert torch.allclose(other.generate(hires_request(scale=1.5)).latents, reference, atol=1e-5)
    assert other.mode == mode


def test_on_a_small_budget_the_second_pass_picks_a_leaner_mode_for_its_size(tiny_model, pipe):
    """A budget that holds the 64x64 pass in `full` but not the 128x128 one: the second pass is planned apart."""
    reference = pipe.generate(hires_request()).latents
    lean = make_pipe(tiny_model, memory="auto")
    large = lean.memory.planned(core.planner_request(lean, TXT2IMG, GenerationRequest(**{**BASE, "height": 128, "width": 128})), None)
    lean.memory.budget = int((large.estimates["full"] + large.estimates["stream"]) // 2 / SAFETY_MARGIN)
    modes = []
    prepare = lean.memory.prepare

    def recorded(request, **options):
        plan = prepare(request, **options)
        modes.append(plan.mode)
        return plan

    lean.memory.prepare = recorded
    assert torch.allclose(lean.generate(hires_request()).latents, reference, atol=1e-5)
    assert modes[0] == "full" and modes[1] != "full"


def test_the_second_pass_is_planned_for_its_own_size(pipe, monkeypatch):
    planned = []
    prepare = pipe.memory.prepare

    def recorded(request, **options):
        planned.append((request.height, request.width))
        return prepare(request, **options)

    monkeypatch.setattr(pipe.memory, "prepare", recorded)
    decoded = []
    decode = core.decode_images
    monkeypatch.setattr(core, "decode_images", lambda pipe, x, tiled: decoded.append(x.shape[-1]) or decode(pipe, x, tiled))
    pipe.generate(hires_request())
    assert planned == [(64, 64), (128, 128)]
    assert decoded == [16]  # a latent upscaler's first pass is not decoded (as AUTOMATIC1111)


def test_a_resize_to_another_aspect_covers_it_and_crops_the_middle(pipe):
    result = pipe.generate(hires_request(resize=(128, 96)))
    assert result.images[0].size == (128, 96)
    assert HiresFix(resize=(128, 96)).target(64, 64) == (128, 128, 128, 96)
    assert HiresFix(resize=(96, 192)).target(64, 128) == (96, 192, 96, 192)


def test_the_metadata_has_automatic1111_s_hires_fields(pipe):
    text = pipe.generate(hires_request(steps=10, strength=0.7)).parameters[0].text()
    line = text.splitlines()[-1]
    assert "Steps: 4, Sampler: Euler, CFG scale: 7.5, Seed: 7, Size: 64x64," in line
    assert line.endswith("Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent")
    resized = pipe.generate(hires_request(resize=(128, 128), steps=0, upscaler="lanczos")).parameters[0].text()
    assert resized.endswith("Denoising strength: 0.6, Hires resize: 128x128, Hires upscaler: Lanczos")
    assert HiresFix(sampler="euler_a", prompt="a castle").metadata()[-2:] == (("Hires sampler", "Euler a"), ("Hires prompt", "a castle"))


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(hr_scale=math.nan), "hr_scale"),
        (dict(hr_scale=0.5), "hr_scale"),
        (dict(hr_scale=100.0), "hr_scale"),
        (dict(hr_upscaler="bilinear"), "hr_upscaler"),
        (dict(hr_strength=2.0), "hr_strength"),
        (dict(hr_steps=-1), "hr_steps"),
        (dict(hr_resize=(100, 128)), "hr_resize"),
        (dict(hr_resize=(128, 1 << 20)), "hr_resize"),
        (dict(init_image=Image.new("RGB", (64, 64))), "hires"),
    ],
)
def test_the_job_refuses_bad_hires_fields_naming_them(changes, field):
    job = Job(prompts=("a",), height=64, width=64, hires=True, **changes)
    with pytest.raises(FieldError) as refused:
        job.validate()
    assert refused.value.field == field
    dataclasses.replace(job, hires=False).validate() if "init_image" not in changes else None  # ignored unless enabled


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hr-scale", "nan"], "error: --hr-scale must be a finite number, not nan\n"),
        (["--hr-scale", "0.5"], "error: --hr-scale must be at least 1 (at most 8), got 0.5\n"),
        (["--hr-scale", "2", "--hr-upscaler", "bilinear"], "error: --hr-upscaler 'bilinear' is unknown; use one of latent, "
         "latent-antialiased, latent-bicubic, latent-bicubic-antialiased, latent-nearest, latent-nearest-exact, none, lanczos, nearest\n"),
        (["--hr-scale", "2", "--hr-strength", "2"], "error: --hr-strength must be from 0 to 1, got 2.0\n"),
        (["--hr-resize", "100x128"], "error: --hr-resize 100x128: each side must be a multiple of 8 (at least 8)\n"),
        (["--hr-resize", "big"], "error: --hr-resize 'big' must be WIDTHxHEIGHT, e.g. 1024x768\n"),
        (["--hr-steps", "10"], "error: --hr-steps needs --hr-scale or --hr-resize (the hires fix is off)\n"),
    ],
)  # fmt: skip
def test_the_cli_refuses_bad_hires_flags_in_one_line_writing_nothing(capsys, tmp_path, flags, message):
    outdir = tmp_path / "out"
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", tmp_path / "never-loaded.ckpt", "--outdir", outdir, "--H", 64, "--W", 64, *flags)
    assert (code, err) == (1, message)
    assert not outdir.exists()


def test_the_cli_writes_only_the_final_image(capsys, tiny_model, tmp_path):
    outdir = tmp_path / "out"
    code, out, err = run_cli(capsys, "txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--device", "cpu",
                             "--outdir", outdir, "--H", 64, "--W", 64, "--n_samples", 1, "--ddim_steps", 2, "--sampler", "euler",
                             "--seed", 1, "--hr-scale", 2, "--hr-steps", 2, "--hr-upscaler", "nearest", "--prompt", "a cube")  # fmt: skip
    assert code == 0, err
    written = sorted(p for p in outdir.rglob("*.png"))
    assert len(written) == 1
    image = Image.open(written[0])
    assert image.size == (128, 128)
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Nearest" in image.text["parameters"]


def test_a_batch_line_turns_the_hires_fix_on_with_hr_scale_and_names_a_bad_key(tmp_path):
    from optimized_sd.batch.jobs import read_jobs
    from optimized_sd.errors import UserError
    from optimized_sd.pipelines.job import OutputPolicy

    path = tmp_path / "jobs.jsonl"
    defaults = Job(height=64, width=64, output=OutputPolicy(tmp_path))
    path.write_text('{"prompt": "a", "hr_scale": 1.5, "hr_upscaler": "Lanczos"}\n{"prompt": "b", "hr_steps": 3}\n')
    first, second = (batch.job for batch in read_jobs(path, defaults))
    assert first.hires_fix() == HiresFix(scale=1.5, upscaler="Lanczos") and second.hires_fix() is None
    path.write_text('{"prompt": "a", "hires": true, "hr_strength": 1.5}\n')
    with pytest.raises(UserError, match="line 1: field 'hr_strength' must be from 0 to 1, got 1.5"):
        read_jobs(path, defaults)

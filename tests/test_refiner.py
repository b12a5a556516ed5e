"""The SDXL refiner: alone as an img2img model (against diffusers' StableDiffusionXLImg2ImgPipeline with the
aesthetic score), and after an SDXL base (`refiner=`, `refiner_switch=`), fp32 on the CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

import optimized_sd
from optimized_sd.pipelines.diffusion import GenerationRequest

TOLERANCE = 1e-4
STEPS, SIZE = 3, 64


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Within 1e-4 of the latents' scale (k-samplers' latents are tens: see test_families_pipeline)."""
    return max_diff(ours, theirs) <= TOLERANCE * max(1.0, theirs.abs().max().item())


def load(model, layout: str = "folder", **options):
    options.setdefault("memory", "full")
    path = model.folder if layout == "folder" else model.files[layout]
    if layout != "folder":
        options.setdefault("tokenizer", model.tokenizer)
    return optimized_sd.load(path, device="cpu", precision="full", **options)


def init_image() -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), (180, 60, 20))


def diffusers_refiner(refiner, sampler: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTokenizer

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")
    if sampler == "ddim":
        scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", **common)
    else:
        scheduler = EulerDiscreteScheduler(**common)
    return StableDiffusionXLImg2ImgPipeline(
        vae=refiner.vae, text_encoder=None, text_encoder_2=refiner.text_encoders[0], tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(str(refiner.folder / "tokenizer_2")), unet=refiner.unet, scheduler=scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )


@pytest.mark.parametrize("layout", ["folder", "real"])
def test_refiner_img2img_matches_diffusers(tiny_refiner, layout):
    """The refiner alone: bigG context, y = [pooled | size, crop, aesthetic score 6 (negative: 2.5)]."""
    pipe = load(tiny_refiner, layout)
    assert pipe.config.family == "sdxl_refiner" and pipe.config.text is None
    image = init_image()
    request = GenerationRequest(prompts=["a red cube"], steps=STEPS, sampler="euler", seed=42, height=SIZE, width=SIZE)
    ours = pipe.generate(replace(request, init_image=image, strength=0.6)).latents
    with torch.inference_mode():
        from optimized_sd.pipelines.images import image_to_tensor

        latents = pipe.model.first_stage_model.encode(image_to_tensor(image)) * pipe.config.scale_factor
    theirs = diffusers_refiner(tiny_refiner, "euler")(
        "a red cube", image=latents, strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(42), output_type="latent",
    ).images
    assert ours.abs().max() > 0.1
    assert close(ours, theirs)


def test_handover_step_is_the_timestep_cutoff():
    """The base runs the steps starting at timestep >= round(1000 * (1 - switch)) (diffusers' denoising_end,
    AUTOMATIC1111's switch by timestep): 80% of a linspace or DDIM grid, fewer on an img2img's short tail."""
    from optimized_sd.sampling import handover_step, make_plan

    assert handover_step(make_plan("euler", 10), 0.8) == 8  # timesteps 999, 888, ..., 222 | 111, 0
    assert handover_step(make_plan("ddim", 4), 0.5) == 2  # 751, 501 | 251, 1
    assert handover_step(make_plan("dpmpp_2m", 3), 0.75) == 3  # 999, 666, 333: all above 250
    assert handover_step(make_plan("euler", 10, strength=0.3), 0.8) == 1  # 222 | 111, 0
    assert handover_step(make_plan("euler", 10, strength=0.2), 0.8) == 0  # 111, 0: the refiner alone
    with pytest.raises(ValueError):
        handover_step(make_plan("euler", 10), 1.0)


# -- base + refiner --------------------------------------------------------------------------------
def diffusers_base(base, sampler: str):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    reference = diffusers_refiner(base, sampler)  # for its scheduler only
    return StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
        tokenizer=CLIPTokenizer.from_pretrained(str(base.folder / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(base.folder / "tokenizer_2")),
        unet=base.unet, scheduler=reference.scheduler, force_zeros_for_empty_prompt=True,
    )


def refined(sampler: str, switch: float = 0.5, **fields) -> GenerationRequest:
    values = dict(prompts=["a red cube"], steps=4, sampler=sampler, seed=42, height=SIZE, width=SIZE, refiner_switch=switch)
    values.update(fields)
    return GenerationRequest(**values)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_base_then_refiner_matches_diffusers(tiny_sdxl, tiny_refiner, sampler):
    """diffusers' base with denoising_end=0.5 hands its latents to the refiner with denoising_start=0.5 (4
    steps: the base runs timesteps 999/666 (DDIM 751/501), the refiner the rest); the same switch here is one
    sampler run whose model changes. Euler and DDIM carry no history, so diffusers' restart is the same run."""
    pipe = load(tiny_sdxl)
    result = pipe.generate(refined(sampler, refiner=tiny_refiner.folder))
    generator = torch.Generator("cpu").manual_seed(42)
    handed = diffusers_base(tiny_sdxl, sampler)(
        "a red cube", num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE, denoising_end=0.5,
        generator=generator, output_type="latent",
    ).images
    theirs = diffusers_refiner(tiny_refiner, sampler)(
        "a red cube", image=handed, num_inference_steps=4, guidance_scale=7.5, denoising_start=0.5, generator=generator,
        output_type="latent",
    ).images
    alone = pipe.generate(refined(sampler)).latents  # the base for every step
    assert max_diff(alone, theirs) > 0.01  # the refiner's steps changed the image
    assert close(result.latents, theirs)
    text = result.parameters[0].text()
    assert f"Refiner: {tiny_refiner.folder.name} [" in text and "Refiner switch at: 0.5" in text


def test_refiner_switch_past_the_last_step_leaves_the_base_alone(tiny_sdxl, tiny_refiner):
    """dpmpp_2m's 3-step grid starts at timesteps 999, 666, 333: at 0.75 the cutoff (250) is never reached."""
    pipe = load(tiny_sdxl)
    result = pipe.generate(refined("dpmpp_2m", 0.75, steps=3, refiner=tiny_refiner.folder))
    assert max_diff(result.latents, pipe.generate(refined("dpmpp_2m", steps=3)).latents) == 0
    assert "Refiner" not in result.parameters[0].text()


def test_img2img_starting_below_the_switch_is_the_refiner_alone(tiny_sdxl, tiny_refiner):
    """strength 0.2 of 10 Euler steps starts at timestep 111, past the 0.8 switch: the refiner runs both steps,
    as the refiner's own img2img does (the two share the VAE that encodes the init image)."""
    request = refined("euler", 0.8, steps=10, init_image=init_image(), strength=0.2)
    pipe = load(tiny_sdxl)
    result = pipe.generate(replace(request, refiner=tiny_refiner.folder))
    assert max_diff(result.latents, load(tiny_refiner).generate(request).latents) <= 1e-6
    assert "Refiner: sdxl-refiner" in result.parameters[0].text()


def test_one_memory_report_holds_the_base_and_the_refiner(tiny_sdxl, tiny_refiner):
    """The refiner's stages land in the base's meter, prefixed, within the same call: 4 Euler steps switched
    at 0.5 are 2 UNet calls each, and the refiner (which sampled last) decodes. The next call starts afresh."""
    pipe = load(tiny_sdxl)
    pipe.generate(refined("euler", refiner=tiny_refiner.folder))
    stages = pipe.meter.summary()
    assert list(stages) == ["text", "unet", "refiner_text", "refiner_unet", "refiner_vae_decode"]
    assert stages["unet"]["steps"] == 2 and stages["refiner_unet"]["steps"] == 2
    assert pipe.meter.calls == 1 and "refiner_vae_decode" in pipe.meter.format_table()
    pipe.generate(refined("euler"))
    assert list(pipe.meter.summary()) == ["text", "unet", "vae_decode"] and pipe.meter.calls == 2


def test_a_single_file_refiner_behind_a_folder_base_needs_no_tokenizer(tiny_sdxl, tiny_refiner):
    """bigG's tokenizer is the base folder's `tokenizer_2`; without it the single file would look for the hub's."""
    pipe = load(tiny_sdxl)
    latents = pipe.generate(refined("euler", refiner=tiny_refiner.files["real"])).latents
    reference = load(tiny_sdxl).generate(refined("euler", refiner=tiny_refiner.folder)).latents
    assert max_diff(latents, reference) <= 1e-5


@pytest.mark.parametrize("mode", ["turbo", "split", "stream"])
def test_every_mode_with_a_refiner_gives_the_full_image(tiny_sdxl, tiny_refiner, mode, monkeypatch):
    from optimized_sd.pipelines import placement

    full = load(tiny_sdxl).generate(refined("dpmpp_2m", refiner=tiny_refiner.folder)).latents
    monkeypatch.setattr(placement, "STREAM_UNIT_PARAMS", 1000)
    pipe = load(tiny_sdxl, memory=mode)
    latents = pipe.generate(refined("dpmpp_2m", refiner=tiny_refiner.folder)).latents
    assert pipe.refiner is not None and pipe.refiner.mode == mode
    assert max_diff(latents, full) <= 1e-5


def test_base_released_when_both_do_not_fit(tiny_sdxl, tiny_refiner):
    """A budget that holds one model in `full` but not both: the base's weights leave before the refiner's
    are placed, and the refiner's before the next call places the base; the image is the same."""
    reference = load(tiny_sdxl).generate(refined("euler", refiner=tiny_refiner.folder)).latents
    roomy = load(tiny_sdxl)
    roomy.generate(refined("euler", refiner=tiny_refiner.folder))
    assert roomy.engine is not None and roomy.refiner.engine is not None  # no budget: both stay placed

    from optimized_sd.pipelines.core import planner_request
    from optimized_sd.pipelines.txt2img import TXT2IMG

    request = planner_request(roomy, TXT2IMG, refined("euler"))
    from optimized_sd.memory.planner import SAFETY_MARGIN

    alone = max(model.memory.planned(request, None).estimates["full"] for model in (roomy, roomy.refiner))
    budget = int(alone / SAFETY_MARGIN) + 1  # either alone fits in what a CPU plan keeps of the budget
    pipe = load(tiny_sdxl, vram_budget=budget)
    seen = []

    def progress(info) -> None:
        seen.append((info.step, pipe.engine is not None, pipe.refiner.engine if pipe.refiner else None))

    latents = pipe.generate(refined("euler", refiner=tiny_refiner.folder), progress).latents
    assert max_diff(latents, reference) <= 1e-5
    assert pipe.engine is None and pipe.refiner.engine is not None and pipe.refiner.mode == "full"
    assert seen[0][1] and seen[-1][1] is False
    pipe.generate(refined("euler", refiner=tiny_refiner.folder))
    assert pipe.engine is None  # placed again for the next call's base steps, released again at the switch
    pipe.generate(refined("euler"))
    assert pipe.engine is not None and pipe.refiner.engine is None


# -- the command line ------------------------------------------------------------------------------
def run_cli(tiny_sdxl, tmp_path, *extra, ckpt=None):
    from optimized_sd.cli import main

    args = [
        "txt2img", "--ckpt", ckpt or tiny_sdxl.files["real"], "--tokenizer", tiny_sdxl.tokenizer, "--outdir", tmp_path / "out",
        "--H", "64", "--W", "64", "--steps", "4", "--n_samples", "1", "--device", "cpu", "--seed", "5", "--sampler", "euler",
        "--skip_grid", "--precision", "full", *extra,
    ]
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
        raise SystemExit(0)
    return done.value.code


def test_cli_refiner_writes_its_metadata(capsys, tiny_sdxl, tiny_refiner, tmp_path):
    from optimized_sd.pipelines.output import read_parameters

    assert run_cli(tiny_sdxl, tmp_path, "--refiner", tiny_refiner.files["real"], "--refiner-switch", "0.5") == 0
    (image,) = sorted((tmp_path / "out").rglob("*.png"))
    text = read_parameters(image)
    assert "Refiner: sdxl-refiner [" in text and "Refiner switch at: 0.5" in text


def test_cli_reports_the_refiner_beside_the_base(capsys, tiny_sdxl, tiny_refiner, tmp_path):
    import json

    report = tmp_path / "report.json"
    code = run_cli(tiny_sdxl, tmp_path, "--refiner", tiny_refiner.files["real"], "--refiner-switch", "0.5", "--report-json", report)
    assert code == 0
    payload = json.loads(report.read_text())
    assert {"unet", "refiner_unet", "refiner_vae_decode"} <= set(payload["stages"]) and payload["refiner"]["mode"] == "full"
    assert "mode full on cpu, refiner full;" in capsys.readouterr().out


def refused(capsys, tmp_path, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # nothing written
    return err


@pytest.mark.parametrize("switch", ["0", "1", "1.5", "-0.2", "nan"])
def test_cli_refuses_a_switch_outside_0_1(capsys, tiny_sdxl, tiny_refiner, tmp_path, switch):
    code = run_cli(tiny_sdxl, tmp_path, "--refiner", tiny_refiner.files["real"], "--refiner-switch", switch)
    assert "--refiner-switch" in refused(capsys, tmp_path, code)


def test_cli_refuses_what_is_not_a_refiner(capsys, tiny_sdxl, tiny_model, tmp_path):
    """An SDXL base, an SD 1.x checkpoint, a VAE alone and a missing path, each named as what it is."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_sdxl.vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    cases = [
        (tiny_sdxl.files["converted"], "is an SDXL model, not an SDXL refiner"),
        (tiny_model.safetensors, "is an SD 1.x model, not an SDXL refiner"),
        (tmp_path / "vae.safetensors", "this is a diffusers VAE (AutoencoderKL) file"),
        (tmp_path / "missing.safetensors", "no such file or folder"),
    ]
    for path, words in cases:
        err = refused(capsys, tmp_path, run_cli(tiny_sdxl, tmp_path, "--refiner", path))
        assert err.startswith(f"error: --refiner {path}") and words in err, err


def test_cli_refuses_a_refiner_after_a_base_that_is_not_sdxl(capsys, tiny_sdxl, tiny_refiner, tiny_sd2, tmp_path):
    code = run_cli(tiny_sdxl, tmp_path, "--refiner", tiny_refiner.files["real"], "--prediction", "v", ckpt=tiny_sd2.files["real"])
    assert "--refiner runs after an SDXL base model; sd2-real is an SD 2.x model" in refused(capsys, tmp_path, code)

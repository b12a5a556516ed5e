"""SD 2.x (v-prediction) and SDXL through the whole pipeline, fp32 on the CPU: txt2img (DDIM, Euler) and
img2img (Euler) latents against diffusers' StableDiffusion(Img2Img)Pipeline and StableDiffusionXL(Img2Img)Pipeline;
the single files and the folder give the same image; every memory mode gives `full`'s image.

DDIM img2img is not compared: ours follows CompVis (noised to grid index t_enc, as optimizedSD), diffusers
noises one grid step later; `test_sampling` checks each convention on its own."""

from __future__ import annotations

import pytest
import torch

import optimized_sd
from optimized_sd.pipelines.diffusion import GenerationRequest

TOLERANCE = 1e-4
STEPS, SIZE = 3, 64


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Within 1e-4 of the latents' scale: k-samplers start from noise * sigma_max (about 15), so Euler's
    latents are tens, and float32 rounding in the two pipelines' different op orders grows with them."""
    return max_diff(ours, theirs) <= TOLERANCE * max(1.0, theirs.abs().max().item())


def load(model, layout: str = "folder", **options):
    options.setdefault("memory", "full")
    path = model.folder if layout == "folder" else model.files[layout]
    if layout != "folder":
        options.setdefault("tokenizer", model.tokenizer)  # a single file takes --tokenizer for every tower
    return optimized_sd.load(path, device="cpu", precision="full", **options)


def request(sampler: str, init_image=None, **fields) -> GenerationRequest:
    values = dict(prompts=["a red cube"], steps=STEPS, scale=7.5, sampler=sampler, seed=42, height=SIZE, width=SIZE)
    values.update(fields)
    return GenerationRequest(init_image=init_image, strength=0.6, **values)


def scheduler(name: str, prediction_type: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type)
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", **common)
    return EulerDiscreteScheduler(**common)


def init_image():
    from PIL import Image

    return Image.new("RGB", (SIZE, SIZE), (180, 60, 20))


def init_latents(pipe, image) -> torch.Tensor:
    """Our VAE's encoding (the mean, scaled), handed to diffusers as latents so it does not sample its own."""
    from optimized_sd.pipelines.diffusion import image_to_tensor

    with torch.inference_mode():
        return pipe.model.first_stage_model.encode(image_to_tensor(image)) * pipe.config.scale_factor


# -- SD 2.x (v) ------------------------------------------------------------------------------------
def diffusers_sd2(model, name: str, img2img: bool):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    return cls(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=CLIPTokenizer.from_pretrained(str(model.tokenizer)),
        unet=model.unet, scheduler=scheduler(name, "v_prediction"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize(("sampler", "img2img"), [("ddim", False), ("euler", False), ("euler", True)])
def test_sd2_v_matches_diffusers(tiny_sd2, sampler, img2img):
    pipe = load(tiny_sd2)
    assert pipe.config.prediction_type == "v_prediction" and pipe.prediction_reason == "scheduler_config.json"
    image = init_image() if img2img else None
    ours = pipe.generate(request(sampler, image)).latents
    reference = diffusers_sd2(tiny_sd2, sampler, img2img)
    kwargs = dict(image=init_latents(pipe, image), strength=0.6) if img2img else dict(height=SIZE, width=SIZE)
    theirs = reference(
        "a red cube", num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(42),
        output_type="latent", **kwargs,
    ).images
    assert ours.abs().max() > 0.1
    assert close(ours, theirs)


# -- SDXL ------------------------------------------------------------------------------------------
def diffusers_sdxl(model, name: str, img2img: bool):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    extra = dict(requires_aesthetics_score=False) if img2img else {}
    return cls(
        vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
        tokenizer=CLIPTokenizer.from_pretrained(str(model.folder / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(model.folder / "tokenizer_2")),
        unet=model.unet, scheduler=scheduler(name, "epsilon"), force_zeros_for_empty_prompt=True, **extra,
    )


@pytest.mark.parametrize(("sampler", "img2img"), [("ddim", False), ("euler", False), ("euler", True)])
def test_sdxl_matches_diffusers(tiny_sdxl, sampler, img2img):
    pipe = load(tiny_sdxl)
    assert pipe.config.family == "sdxl" and pipe.config.prediction_type == "epsilon"
    image = init_image() if img2img else None
    ours = pipe.generate(request(sampler, image)).latents
    reference = diffusers_sdxl(tiny_sdxl, sampler, img2img)
    kwargs = dict(image=init_latents(pipe, image), strength=0.6) if img2img else dict(height=SIZE, width=SIZE)
    theirs = reference(
        "a red cube", num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(42),
        output_type="latent", **kwargs,
    ).images
    assert ours.abs().max() > 0.1
    assert close(ours, theirs)


# -- layouts and memory modes ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_layouts_give_the_same_image(tiny_sd2, tiny_sdxl, family):
    """The diffusers folder, the script-converted file and the real-layout file: the same latents.
    (Single files say nothing of their prediction type, so SD 2.x's get --prediction v.)"""
    model = tiny_sd2 if family == "sd2" else tiny_sdxl
    options = dict(prediction="v") if family == "sd2" else {}
    results = [load(model, layout, **options).generate(request("euler")).latents for layout in ("folder", "converted", "real")]
    assert max_diff(results[1], results[0]) <= 1e-5 and max_diff(results[2], results[0]) <= 1e-5


@pytest.mark.parametrize("mode", ["turbo", "split", "stream"])
def test_sdxl_every_mode_gives_the_full_image(tiny_sdxl, mode, monkeypatch):
    """In `stream`, every block is split to its parts and each tower streams by layer (a tiny unit bound)."""
    from optimized_sd.pipelines import placement

    full = load(tiny_sdxl).generate(request("euler", prompts=["a red cube", "a blue ball"])).latents
    monkeypatch.setattr(placement, "STREAM_UNIT_PARAMS", 1000)
    pipe = load(tiny_sdxl, memory=mode)
    latents = pipe.generate(request("euler", prompts=["a red cube", "a blue ball"])).latents
    assert max_diff(latents, full) <= 1e-5

"""The SDXL refiner: alone as an img2img model (against diffusers' StableDiffusionXLImg2ImgPipeline with the
aesthetic score), and after an SDXL base (`refiner=`, `refiner_switch=`), fp32 on the CPU."""

from __future__ import annotations

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
    ours = pipe.generate(
        GenerationRequest(prompts=["a red cube"], steps=STEPS, sampler="euler", seed=42, height=SIZE, width=SIZE, init_image=image, strength=0.6)
    ).latents
    with torch.inference_mode():
        from optimized_sd.pipelines.images import image_to_tensor

        latents = pipe.model.first_stage_model.encode(image_to_tensor(image)) * pipe.config.scale_factor
    theirs = diffusers_refiner(tiny_refiner, "euler")(
        "a red cube", image=latents, strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(42), output_type="latent",
    ).images
    assert ours.abs().max() > 0.1
    assert close(ours, theirs)

"""Parity with diffusers on identical weights, fp32 on CPU: each network and a whole txt2img run."""

from __future__ import annotations

import pytest
import torch

import optimized_sd
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.weights.loading import materialize, prepare_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def ours(tiny_model):
    loaded = prepare_model(tiny_model.safetensors)
    materialize(loaded.model, "", loaded.source, torch.device("cpu"), torch.float32)
    return loaded.model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.inference_mode()
def test_text_encoder_matches(ours, tiny_model):
    ids = torch.randint(0, 998, (2, 77))
    expected = tiny_model.text_encoder(input_ids=ids).last_hidden_state
    assert max_diff(ours.cond_stage_model(ids), expected) <= TOLERANCE


@torch.inference_mode()
def test_unet_matches(ours, tiny_model):
    torch.manual_seed(1)
    x, context = torch.randn(2, 4, 16, 24), torch.randn(2, 77, 64)
    t = torch.tensor([999.0, 37.0])
    expected = tiny_model.unet(x, t, encoder_hidden_states=context).sample
    got = ours.model.diffusion_model(x, t, context)
    assert expected.abs().max() > 0.1  # a real signal, not two zero tensors
    assert max_diff(got, expected) <= TOLERANCE


@torch.inference_mode()
def test_vae_encode_and_decode_match(ours, tiny_model):
    torch.manual_seed(2)
    image, latent = torch.rand(1, 3, 64, 48) * 2 - 1, torch.randn(1, 4, 8, 6)
    assert max_diff(ours.first_stage_model.encode(image), tiny_model.vae.encode(image).latent_dist.mean) <= TOLERANCE
    assert max_diff(ours.first_stage_model.decode(latent), tiny_model.vae.decode(latent).sample) <= TOLERANCE


def diffusers_pipeline(tiny_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        vae=tiny_model.vae,
        text_encoder=tiny_model.text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tiny_model.tokenizer)),
        unet=tiny_model.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_txt2img_ddim_matches_diffusers(tiny_model):
    """DDIM, 4 steps, CFG 7.5, same seed: the latents agree, and so do the decoded images."""
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="full")
    request = GenerationRequest(prompts=["a red cube"], steps=4, scale=7.5, sampler="ddim", seed=42, height=64, width=64)
    result = pipe.generate(request)
    reference = diffusers_pipeline(tiny_model)(
        "a red cube",
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(42),
        output_type="latent",
    ).images
    assert max_diff(result.latents, reference) <= TOLERANCE


def test_loaders_agree(tiny_model):
    """The diffusers folder, the .safetensors and the .ckpt give the same tensors under LDM names."""
    sources = [prepare_model(path).source for path in (tiny_model.folder, tiny_model.safetensors, tiny_model.ckpt)]
    keys = sorted(sources[0].keys())
    assert all(sorted(s.keys()) == keys for s in sources[1:])
    for key in keys:
        reference = sources[1].get(key)
        for source in (sources[0], sources[2]):
            assert torch.equal(source.get(key).reshape(reference.shape), reference), key

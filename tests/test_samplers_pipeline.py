"""Every sampler through the real pipeline: txt2img and img2img, in every memory mode, giving the
same image as `full`. OPTIMIZED_SD_TEST_DEVICE=cuda runs the same checks on a GPU in fp16."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

import optimized_sd
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.sampling import SAMPLERS

DEVICE = os.environ.get("OPTIMIZED_SD_TEST_DEVICE", "cpu")
PRECISION = "autocast"  # fp32 on CPU, fp16 on CUDA
MODES = ("full", "turbo", "split", "stream")


@pytest.fixture(scope="module")
def pipes(tiny_model):
    return {
        mode: optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device=DEVICE, precision=PRECISION, memory=mode)
        for mode in MODES
    }


def run(pipe, sampler: str, img2img: bool):
    init = Image.new("RGB", (64, 64), (180, 60, 20)) if img2img else None
    request = GenerationRequest(
        prompts=["a cube", "a ball"], steps=4, sampler=sampler, seed=11, height=64, width=64,
        karras=sampler not in ("ddim", "plms"), init_image=init, strength=0.5,
    )
    return pipe.generate(request).latents


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_in_every_mode(pipes, sampler, img2img):
    reference = run(pipes["full"], sampler, img2img)
    assert torch.isfinite(reference).all()
    tolerance = 1e-5 if reference.dtype == torch.float32 and DEVICE == "cpu" else 2e-3
    scale = max(1.0, reference.abs().max().item())
    for mode in MODES[1:]:
        latents = run(pipes[mode], sampler, img2img)
        assert (latents - reference).abs().max().item() <= tolerance * scale, mode

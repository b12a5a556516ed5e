"""Z-Image through `load()` and the CLI, against diffusers' ZImagePipeline and ZImageImg2ImgPipeline on tiny random
models (fp32, CPU): text embeddings, txt2img latents without and with CFG (its normalization and truncation),
img2img, the file layouts, memory modes, hoisting, LoRA, and the one-line errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from optimized_sd.pipelines.diffusion import GenerationRequest, load
from tests.zimage_models import PROMPT, SIZE, TinyZImage, build

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyZImage:
    return build(tmp_path_factory.mktemp("zimage"))


def ours(pipe, **fields):
    return pipe.generate(GenerationRequest(prompts=[PROMPT], seed=42, height=SIZE[0], width=SIZE[1], **fields))


def reference_latents(model: TinyZImage, steps: int, scale: float, kind=None, **extra) -> torch.Tensor:
    pipeline = model.diffusers_pipeline(kind)
    with torch.no_grad():
        return pipeline(
            prompt=PROMPT, height=SIZE[0], width=SIZE[1], num_inference_steps=steps, guidance_scale=scale,
            generator=torch.Generator("cpu").manual_seed(42), output_type="latent", **extra,
        ).images


def close(ours_latents: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours_latents.shape == expected.shape
    assert torch.allclose(ours_latents, expected, atol=1e-4), (ours_latents - expected).abs().max()


def test_text_embeddings_equal_diffusers(tiny):
    pipe = tiny.load(memory="stream")  # the tower layer by layer, its embedding by rows
    request = pipe.with_defaults(GenerationRequest(prompts=[PROMPT, "x"], height=SIZE[0], width=SIZE[1], scale=2.0))
    pipe.prepare(request)
    cond, uncond, _ = pipe.memory.run_stage("text", lambda record: pipe.text_conditioning(request, [PROMPT, "x"], "blurry"))
    with torch.no_grad():
        expected, negative = tiny.diffusers_pipeline().encode_prompt([PROMPT, "x"], device="cpu", negative_prompt=["blurry"] * 2)
    assert cond.lengths == tuple(e.shape[0] for e in expected) and uncond.lengths == (negative[0].shape[0],) * 2
    for ours_caption, theirs in zip([*cond.captions(), *uncond.captions()], [*expected, *negative], strict=True):
        assert torch.allclose(ours_caption, theirs, atol=1e-5)


def test_txt2img_latents_equal_diffusers(tiny):
    pipe = tiny.load()
    result = ours(pipe, steps=3)
    close(result.latents, reference_latents(tiny, 3, 0.0))
    fields = result.parameters[0].text().splitlines()[-1]
    assert pipe.config.family_name == "Z-Image"
    assert "Sampler: Euler" in fields and "CFG scale: 0," in fields and "Shift: 3" in fields
    request = pipe.with_defaults(GenerationRequest(prompts=["x"]))
    assert (request.steps, request.scale, request.height, request.sampler, request.guided) == (8, 0.0, 1024, "euler", False)

"""Inpainting and outpainting on the tiny models (fp32 CPU): parity with diffusers'
StableDiffusionInpaintPipeline for 9-channel and 4-channel UNets, every memory mode, the stages
in the report, the paste-back, and bad input through the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import optimized_sd
from optimized_sd.config import TINY, UNetConfig
from optimized_sd.errors import UserError
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.masks import InpaintOptions
from tests.conftest import perturbed, write_ldm_files, write_model_index
from tests.test_cli import files, run

TOLERANCE = 1e-4


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |difference| over the latents' scale: Euler on random tiny weights with CFG 7.5 ends
    with |latents| ~ 30, where float32 rounding alone is ~1e-5 relative."""
    return (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())


@pytest.fixture(scope="module")
def tiny_inpainting(tiny_model, tmp_path_factory):
    """The tiny model with a 9-channel UNet (latents + mask + masked-image latents), as a diffusers
    folder and an LDM single file; returns (folder, safetensors path, diffusers UNet)."""
    from dataclasses import replace

    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("tiny-inpainting")
    torch.manual_seed(3)
    unet = perturbed(UNet2DConditionModel.from_config({**tiny_model.unet.config, "in_channels": 9}))
    folder = root / "diffusers"
    shutil.copytree(tiny_model.folder, folder)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    write_model_index(folder, "StableDiffusionInpaintPipeline")
    config = replace(TINY, unet=UNetConfig(**{**TINY.unet.__dict__, "in_channels": 9}))
    single = root / "tiny-inpainting.safetensors"
    write_ldm_files(folder, single, root / "tiny-inpainting.ckpt", config)
    return folder, single, unet


def test_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


test_image.__test__ = False  # a helper, not a test


def square_mask(box=(16, 24, 48, 56)) -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, box)
    return mask


def scheduler(name: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return EulerDiscreteScheduler(**common, timestep_spacing="linspace")


def diffusers_latents(tiny_model, unet, sampler: str, strength: float, monkeypatch) -> torch.Tensor:
    """diffusers' inpainting latents. We encode images to the mean of the VAE's latent distribution
    (as our img2img does, and CompVis' DDIM img2img); diffusers samples from it, drawing from the
    generator first. The test sets diffusers to the mean (its `argmax` mode), so the seeded noise
    is the generator's first draw on both sides."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module
    from transformers import CLIPTokenizer

    original = module.retrieve_latents
    mean = lambda output, generator=None, sample_mode="sample": original(output, generator, "argmax")  # noqa: E731
    monkeypatch.setattr(module, "retrieve_latents", mean)
    pipe = StableDiffusionInpaintPipeline(
        vae=tiny_model.vae,
        text_encoder=tiny_model.text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tiny_model.tokenizer)),
        unet=unet,
        scheduler=scheduler(sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe(
        "a red cube",
        image=test_image(),
        mask_image=square_mask(),
        height=64,
        width=64,
        strength=strength,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(42),
        output_type="latent",
    ).images


def inpaint_request(sampler: str = "ddim", strength: float = 1.0, **options) -> GenerationRequest:
    inpaint = InpaintOptions(**{"mask": square_mask(), "mask_blur": 0, **options})
    return GenerationRequest(
        prompts=["a red cube"], steps=4, scale=7.5, sampler=sampler, seed=42, height=64, width=64,
        init_image=test_image(), strength=strength, inpaint=inpaint,
    )  # fmt: skip


def load(path, tokenizer, **options):
    return optimized_sd.load(path, tokenizer=tokenizer, device="cpu", precision="full", **{"memory": "full", **options})


SLOW = pytest.mark.slow
CASES = [("ddim", 1.0), pytest.param("euler", 1.0, marks=SLOW), pytest.param("ddim", 0.75, marks=SLOW), ("euler", 0.5)]
CASES_4 = [pytest.param("ddim", 1.0, marks=SLOW), ("euler", 1.0), ("ddim", 0.75), pytest.param("euler", 0.5, marks=SLOW)]


@pytest.mark.parametrize(("sampler", "strength"), CASES)
def test_9_channel_matches_diffusers(tiny_model, tiny_inpainting, sampler, strength, monkeypatch):
    folder, single, unet = tiny_inpainting
    expected = diffusers_latents(tiny_model, unet, sampler, strength, monkeypatch)
    for path in (single, folder):
        got = load(path, tiny_model.tokenizer).generate(inpaint_request(sampler, strength)).latents
        assert relative_error(got, expected) <= TOLERANCE, path


@pytest.mark.parametrize(("sampler", "strength"), CASES_4)
def test_4_channel_matches_diffusers(tiny_model, sampler, strength, monkeypatch):
    expected = diffusers_latents(tiny_model, tiny_model.unet, sampler, strength, monkeypatch)
    got = load(tiny_model.safetensors, tiny_model.tokenizer).generate(inpaint_request(sampler, strength)).latents
    assert expected.abs().max() > 0.1
    assert relative_error(got, expected) <= TOLERANCE


@pytest.mark.parametrize("mode", ["turbo", "split", "stream"])
def test_every_memory_mode_equals_full(tiny_model, tiny_inpainting, mode):
    for path in (tiny_model.safetensors, tiny_inpainting[1]):
        request = inpaint_request("euler", 0.8, mask_blur=2)
        reference = load(path, tiny_model.tokenizer).generate(request)
        pipe = load(path, tiny_model.tokenizer, memory=mode)
        result = pipe.generate(request)
        assert pipe.mode == mode
        assert (result.latents - reference.latents).abs().max().item() <= 1e-5
        assert [np.asarray(i).tolist() for i in result.images] == [np.asarray(i).tolist() for i in reference.images]


def test_stages_and_paste_back(tiny_model):
    pipe = load(tiny_model.safetensors, tiny_model.tokenizer)
    result = pipe.generate(inpaint_request("euler", 1.0))
    assert {"mask", "vae_encode", "unet", "vae_decode"} <= set(pipe.meter.summary())
    out, original = np.asarray(result.images[0]), np.asarray(test_image())
    keep = np.asarray(square_mask()) == 0
    assert np.array_equal(out[keep], original[keep])  # outside the mask: the input, exactly
    assert not np.array_equal(out[~keep], original[~keep])


def test_only_masked_and_outpaint_sizes(tiny_model):
    pipe = load(tiny_model.safetensors, tiny_model.tokenizer)
    image = test_image().resize((96, 80))
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (40, 30, 56, 46))
    masked = pipe.inpaint("a red cube", image, mask, inpaint_area="masked", padding=4, height=64, width=64, steps=2, seed=1, mask_blur=0)
    assert masked[0].size == (96, 80)
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(masked[0])[keep], np.asarray(image)[keep])
    grown = pipe.inpaint("a red cube", image, None, outpaint=(8, 0, 16, 0), steps=2, seed=1)
    assert grown[0].size == (104, 96)
    assert np.array_equal(np.asarray(grown[0])[16 + 8 :, 8 + 8 :], np.asarray(image)[8:, 8:])  # beyond the 4-pixel blur ramp: untouched


@pytest.fixture
def cli_base(tiny_model, tmp_path):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    test_image().save(image)
    square_mask().save(mask)
    flags = [
        "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path / "out",
        "--ddim_steps", "2", "--n_samples", "1", "--device", "cpu", "--seed", "5", "--init-img", image,
    ]  # fmt: skip
    return flags, mask


def test_cli_inpaint_writes_images(capsys, cli_base, tmp_path):
    flags, mask = cli_base
    code, out, err = run(capsys, "inpaint", *flags, "--mask", mask, "--mask-blur", "2", "--strength", "0.9")
    assert code == 0, err
    written = files(tmp_path / "out")
    assert len(written) == 1 and Image.open(written[0]).size == (64, 64)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--mask", "{black}"], "all black"),
        (["--mask", "{text}"], "not a readable image"),
        (["--mask", "{missing}"], "mask not found"),
        ([], "needs a mask"),
        (["--mask", "{mask}", "--outpaint", "1,2"], "outpaint"),
        (["--mask", "{mask}", "--padding", "-1", "--inpaint-area", "masked"], "padding"),
        (["--mask", "{mask}", "--mask-blur", "-3"], "mask-blur"),
        (["--mask", "{mask}", "--masked-content", "noise"], "masked-content"),
    ],
)
def test_cli_bad_input(capsys, cli_base, tmp_path, extra, needle):
    flags, mask = cli_base
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    (tmp_path / "text.png").write_text("not an image")
    paths = {"black": tmp_path / "black.png", "text": tmp_path / "text.png", "missing": tmp_path / "none.png", "mask": mask}
    code, out, err = run(capsys, "inpaint", *flags, *[e.format(**paths) for e in extra])
    assert code == 1
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
    assert files(tmp_path / "out") == []


def test_9_channel_model_without_a_mask_is_a_clear_error(tiny_model, tiny_inpainting):
    pipe = load(tiny_inpainting[1], tiny_model.tokenizer)
    with pytest.raises(UserError, match="inpainting model"):
        pipe.txt2img("a red cube", steps=2, height=64, width=64, seed=1)


def test_api_inpaint_equals_generate(tiny_model):
    pipe = load(tiny_model.safetensors, tiny_model.tokenizer)
    expected = pipe.generate(inpaint_request("ddim", 1.0)).images[0]
    got = pipe.inpaint("a red cube", test_image(), square_mask(), steps=4, sampler="ddim", seed=42, mask_blur=0, strength=1.0)[0]
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_mask_path_and_rgba_alpha(tiny_model, tmp_path):
    pipe = load(tiny_model.safetensors, tiny_model.tokenizer)
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.putalpha(square_mask())
    rgba.save(tmp_path / "alpha.png")
    expected = pipe.generate(inpaint_request("euler")).latents
    got = pipe.generate(inpaint_request("euler", mask=Path(tmp_path / "alpha.png"))).latents
    assert torch.equal(got, expected)


def test_masked_start_replaces_only_the_masked_latents():
    from optimized_sd.pipelines.inpaint import masked_start

    init, noise = torch.full((2, 4, 8, 8), 3.0), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1.0
    inside = mask.expand(2, 4, 8, 8).bool()
    for content in ("original", "fill"):
        assert torch.equal(masked_start(init, noise, mask, content), init)
    noised = masked_start(init, noise, mask, "latent-noise")
    assert torch.equal(noised[inside], noise[inside]) and torch.equal(noised[~inside], init[~inside])
    nothing = masked_start(init, noise, mask, "latent-nothing")
    assert (nothing[inside] == 0).all() and torch.equal(nothing[~inside], init[~inside])


def test_masked_content_changes_the_start_and_keeps_the_rest(tiny_model):
    """Below strength 1 the masked part starts from what masked_content says (the step-0 latents show
    it), and the pixels outside the mask stay the input's whatever it is."""
    pipe = load(tiny_model.safetensors, tiny_model.tokenizer)
    starts: dict[str, torch.Tensor] = {}
    images: dict[str, np.ndarray] = {}
    for content in ("original", "fill", "latent-noise", "latent-nothing"):

        def keep_start(info, content=content):
            if info.step == 0:
                starts[content] = info.x.clone()

        result = pipe.generate(inpaint_request("euler", 0.6, masked_content=content), keep_start)
        images[content] = np.asarray(result.images[0])
    outside = np.asarray(square_mask()) == 0
    for content, image in images.items():
        assert np.array_equal(image[outside], np.asarray(test_image())[outside]), content
    assert len({images[c].tobytes() for c in images}) == 4  # each choice repaints differently
    latent = torch.zeros(1, 1, 8, 8)
    latent[..., 3:7, 2:6] = 1.0  # square_mask()'s box (16..48 x 24..56 px) on the 8x latent grid
    inside = latent.expand_as(starts["original"]).bool()
    nothing, original = starts["latent-nothing"], starts["original"]
    assert torch.equal(nothing[~inside], original[~inside]) and not torch.allclose(nothing[inside], original[inside])
    # Euler starts from source + sigma0 * noise: inside, latent-noise has (1 + sigma0) noise and latent-nothing sigma0 noise.
    noise = (starts["latent-noise"] - nothing)[inside]
    sigma0 = nothing[inside] / noise
    assert noise.abs().max() > 0 and torch.allclose(sigma0, sigma0.median().expand_as(sigma0), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(starts["fill"][inside], original[inside])  # filled pixels encode to other latents

"""ControlNet: the network against diffusers' ControlNetModel (SD 1.x and SDXL), loading in both layouts, family
checks, the side network through a whole txt2img run against StableDiffusionControlNetPipeline (windows, two
ControlNets, guess mode), and the hint preprocessors (Canny on a synthetic square, resize modes)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import optimized_sd
from optimized_sd.errors import CheckpointError, UserError
from optimized_sd.models.controlnet import control_scales
from optimized_sd.pipelines import core
from optimized_sd.pipelines.control_hints import canny, fit_image, hint_tensor, preprocess
from optimized_sd.pipelines.controlnet import ControlNetUnit, control_side_network, step_index, window_keep
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.txt2img import Txt2Img
from optimized_sd.weights.controlnet import (
    check_controlnet_family,
    load_controlnet,
    open_controlnet,
    original_names,
)

TOLERANCE = 1e-5


@dataclass
class ControlNetFiles:
    reference: torch.nn.Module  # diffusers ControlNetModel
    folder: Path  # diffusers folder
    diffusers_file: Path  # its single safetensors
    original: Path  # control_model.* safetensors
    pth: Path  # {"state_dict": control_model.*} pickle
    bare: Path  # original names without the control_model. root


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every parameter, so the zero convs and zero-initialised hint output carry a signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=g) * 0.05)
    return module.eval()


def write_controlnet(unet: torch.nn.Module, root: Path, seed: int) -> ControlNetFiles:
    """A diffusers ControlNet copied from `unet`, saved as a folder and in the original layout (through our
    inverse of the loader's diffusers -> original table)."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    reference = perturb(ControlNetModel.from_unet(unet), seed)
    folder = root / "diffusers"
    reference.save_pretrained(folder)
    diffusers_file = shutil.copy(folder / "diffusion_pytorch_model.safetensors", root / "diffusers-layout.safetensors")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    original = {name: state[key] for name, key in original_names(list(state)).items()}
    assert not [name for name in original if name.startswith("diffusers/")]  # every key has an original name
    save_file({"control_model." + k: v for k, v in original.items()}, str(root / "control.safetensors"))
    save_file(original, str(root / "bare.safetensors"))
    torch.save({"state_dict": {"control_model." + k: v for k, v in original.items()}}, root / "control.pth")
    files = (root / "control.safetensors", root / "control.pth", root / "bare.safetensors")
    return ControlNetFiles(reference, folder, Path(diffusers_file), *files)


@pytest.fixture(scope="module")
def sd1_controlnets(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    return [write_controlnet(tiny_model.unet, root / f"cn{seed}", seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def sdxl_controlnet(tiny_sdxl, tmp_path_factory):
    return write_controlnet(tiny_sdxl.unet, tmp_path_factory.mktemp("controlnet-xl"), 3)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_residuals_match(ours, down, mid) -> None:
    assert len(ours.down) == len(down)
    for got, expected in [*zip(ours.down, down), (ours.middle, mid)]:
        assert expected.abs().max() > 1e-3  # a real signal
        assert max_diff(got, expected) <= TOLERANCE * max(1.0, expected.abs().max().item())


# -- the network against diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("guess_mode", [False, True])
@torch.inference_mode()
def test_sd1_residuals_match_diffusers(sd1_controlnets, guess_mode):
    files = sd1_controlnets[0]
    ours = load_controlnet(files.folder, base_family="sd1")
    torch.manual_seed(4)
    x, context, image = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64), torch.rand(2, 3, 64, 64)
    t = torch.tensor([999.0, 37.0])
    down, mid = files.reference(
        x, t, encoder_hidden_states=context, controlnet_cond=image, conditioning_scale=0.8, guess_mode=guess_mode, return_dict=False
    )
    scales = control_scales(ours.residual_count, "controlnet" if guess_mode else "balanced", 0.8)
    assert_residuals_match(ours(x, ours.encode_hint(image), t, context, scales=scales), down, mid)


@torch.inference_mode()
def test_sdxl_residuals_match_diffusers(sdxl_controlnet):
    files = sdxl_controlnet
    ours = load_controlnet(files.original, base_family="sdxl")
    assert ours.config.adm_in_channels is not None
    torch.manual_seed(5)
    x, context, image = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 96), torch.rand(2, 3, 64, 64)
    text_embeds, time_ids = torch.randn(2, 64), torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 4, 0, 64, 64]])
    t = torch.tensor([500.0, 12.0])
    down, mid = files.reference(
        x, t, encoder_hidden_states=context, controlnet_cond=image, conditioning_scale=0.8,
        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False,
    )  # fmt: skip
    y = torch.cat([text_embeds, files.reference.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
    assert_residuals_match(ours(x, ours.encode_hint(image), t, context, y=y, scales=0.8), down, mid)


# -- loading ---------------------------------------------------------------------------------------------


def test_every_layout_gives_the_same_tensors(sd1_controlnets):
    files = sd1_controlnets[0]
    opened = [open_controlnet(p) for p in (files.folder, files.diffusers_file, files.original, files.pth, files.bare)]
    keys = sorted(opened[0].source.keys())
    assert all(sorted(o.source.keys()) == keys for o in opened[1:])
    assert all(o.config == opened[0].config and o.family == "sd1" for o in opened)
    for key in keys:
        reference = opened[0].source.get(key)
        assert all(torch.equal(o.source.get(key), reference) for o in opened[1:]), key


def test_family_is_read_from_the_tensors(sd1_controlnets, sdxl_controlnet, tiny_sd2, tmp_path):
    sd2 = write_controlnet(tiny_sd2.unet, tmp_path, 6)
    assert open_controlnet(sd2.original).family == "sd2"
    assert open_controlnet(sdxl_controlnet.folder).family == "sdxl"
    with pytest.raises(UserError, match=r"for SDXL models but the model loaded is SD 1\.x"):
        load_controlnet(sdxl_controlnet.original, base_family="sd1")
    with pytest.raises(UserError, match=r"for SD 1\.x models but the model loaded is SDXL refiner"):
        check_controlnet_family("sd1", "sdxl_refiner")
    check_controlnet_family("sd2", "sd2")


def test_a_non_controlnet_file_is_refused_in_one_line(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="is a Stable Diffusion checkpoint, not a ControlNet") as error:
        open_controlnet(tiny_model.safetensors)
    assert "\n" not in str(error.value)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="no input_hint_block"):
        open_controlnet(tmp_path / "other.safetensors")


def test_a_mis_shaped_controlnet_is_refused(sd1_controlnets, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(sd1_controlnets[0].original))
    del tensors["control_model.zero_convs.1.0.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="missing: zero_convs.1.0.weight"):
        load_controlnet(tmp_path / "broken.safetensors")


# -- sampling with ControlNets against StableDiffusionControlNetPipeline ---------------------------------


class ControlledTxt2Img(Txt2Img):
    def __init__(self, units: list[ControlNetUnit]) -> None:
        self.units = units

    def side_network(self, pipe, request, plan):
        return control_side_network(self.units, plan, request.width, request.height, request.guided, pipe.dtype)


def control_image(seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray((g.random((64, 64, 3)) * 255).astype(np.uint8))


def diffusers_controlnet_pipeline(tiny_model, controlnets):
    from diffusers import StableDiffusionControlNetPipeline
    from test_parity import diffusers_pipeline

    base = diffusers_pipeline(tiny_model)
    return StableDiffusionControlNetPipeline(**base.components, controlnet=controlnets)


CASES = {
    "window": dict(units=[(0, 0.8, 0.2, 0.8, "balanced")], guess=False),
    "two": dict(units=[(0, 0.8, 0.0, 0.6, "balanced"), (1, 1.3, 0.4, 1.0, "balanced")], guess=False),
    "guess": dict(units=[(0, 0.9, 0.0, 1.0, "controlnet")], guess=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_with_controlnets_matches_diffusers(tiny_model, sd1_controlnets, case):
    spec = CASES[case]
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="full")
    images = [control_image(index) for index, *_ in spec["units"]]
    units = [
        ControlNetUnit(load_controlnet(sd1_controlnets[index].original, "sd1"), image, weight, start, end, mode)
        for (index, weight, start, end, mode), image in zip(spec["units"], images)
    ]
    request = GenerationRequest(prompts=["a red cube"], steps=5, scale=7.5, sampler="ddim", seed=42, height=64, width=64)
    plain = pipe.generate(request).latents
    result = core.run_task(pipe, ControlledTxt2Img(units), request)
    references = [sd1_controlnets[index].reference for index, *_ in spec["units"]]
    reference = diffusers_controlnet_pipeline(tiny_model, references if len(references) > 1 else references[0])(
        "a red cube",
        image=images if len(images) > 1 else images[0],
        height=64,
        width=64,
        num_inference_steps=5,
        guidance_scale=7.5,
        controlnet_conditioning_scale=[u[1] for u in spec["units"]] if len(images) > 1 else spec["units"][0][1],
        control_guidance_start=[u[2] for u in spec["units"]],
        control_guidance_end=[u[3] for u in spec["units"]],
        guess_mode=spec["guess"],
        generator=torch.Generator("cpu").manual_seed(42),
        output_type="latent",
    ).images
    assert max_diff(result.latents, plain) > 1e-3  # the ControlNets are felt
    assert max_diff(result.latents, reference) <= 1e-4


@pytest.mark.parametrize("guess", [False, True])
def test_sdxl_txt2img_with_a_controlnet_matches_diffusers(tiny_sdxl, sdxl_controlnet, guess):
    """A whole SDXL run with a ControlNet (window 0.2-0.8, weight 0.8; guess mode too) against
    StableDiffusionXLControlNetPipeline: the pooled text and size conditioning reach the ControlNet's label_emb."""
    from diffusers import StableDiffusionXLControlNetPipeline
    from test_families_pipeline import SIZE, STEPS, close, load, request, scheduler
    from transformers import CLIPTokenizer

    pipe = load(tiny_sdxl)
    image = control_image(5).resize((SIZE, SIZE))
    mode = "controlnet" if guess else "balanced"
    units = [ControlNetUnit(load_controlnet(sdxl_controlnet.original, "sdxl"), image, 0.8, 0.2, 0.8, mode)]
    plain = pipe.generate(request("ddim")).latents
    ours = core.run_task(pipe, ControlledTxt2Img(units), request("ddim")).latents
    reference = StableDiffusionXLControlNetPipeline(
        vae=tiny_sdxl.vae, text_encoder=tiny_sdxl.text_encoders[0], text_encoder_2=tiny_sdxl.text_encoders[1],
        tokenizer=CLIPTokenizer.from_pretrained(str(tiny_sdxl.folder / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(tiny_sdxl.folder / "tokenizer_2")),
        unet=tiny_sdxl.unet, controlnet=sdxl_controlnet.reference, scheduler=scheduler("ddim", "epsilon"),
        force_zeros_for_empty_prompt=True,
    )  # fmt: skip
    theirs = reference(
        "a red cube", image=image, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
        controlnet_conditioning_scale=0.8, control_guidance_start=0.2, control_guidance_end=0.8, guess_mode=guess,
        generator=torch.Generator("cpu").manual_seed(42), output_type="latent",
    ).images  # fmt: skip
    assert max_diff(ours, plain) > 1e-3  # the ControlNet is felt
    assert close(ours, theirs), max_diff(ours, theirs)


def test_window_rule_and_step_lookup():
    assert [window_keep(i, 5, 0.2, 0.8) for i in range(5)] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert [window_keep(i, 4, 0.0, 1.0) for i in range(4)] == [1.0] * 4
    timesteps = (801.0, 601.0, 401.0, 201.0, 1.0)
    assert [step_index(t, timesteps) for t in (801.0, 700.0, 601.0, 1.0)] == [0, 0, 1, 4]


def test_side_network_is_silent_outside_every_window_and_encodes_the_hint_once(sd1_controlnets):
    from optimized_sd.sampling import Conditioning, make_plan

    model = load_controlnet(sd1_controlnets[0].folder)
    calls = []
    model.input_hint_block.register_forward_hook(lambda *args: calls.append(1))
    plan = make_plan("euler", 4)
    side = control_side_network([ControlNetUnit(model, control_image(0), start=0.5, end=1.0)], plan, 64, 64, guided=False)
    cond = Conditioning(torch.randn(1, 77, 64))
    ts = [plan.model_sampling.timestep(s) for s in plan.sigmas[:4]]
    with torch.inference_mode():
        outs = [side(torch.randn(1, 4, 8, 8), torch.tensor([t]), cond) for t in ts]
    assert outs[0] is None and outs[1] is None and outs[2] is not None and outs[3] is not None
    assert calls == [1]


def test_unit_fields_are_checked(sd1_controlnets):
    model = load_controlnet(sd1_controlnets[0].folder)
    bad = (({"mode": "loud"}, "control mode"), ({"start": 0.7, "end": 0.2}, "window"), ({"preprocessor": "hed"}, "preprocessor"))
    for fields, word in bad:
        with pytest.raises(UserError, match=word):
            ControlNetUnit(model, control_image(0), **fields)


def test_prompt_mode_weights_follow_automatic1111():
    scales = control_scales(13, "prompt", 2.0)
    assert scales[-1] == pytest.approx(2.0) and scales[0] == pytest.approx(2.0 * 0.825**12)
    guess = control_scales(10, "controlnet", 1.0)
    assert guess[0] == pytest.approx(0.1) and guess[-1] == pytest.approx(1.0)


# -- preprocessors --------------------------------------------------------------------------------------


def square(size: int = 64, low: int = 0, high: int = 255) -> Image.Image:
    array = np.full((size, size, 3), low, dtype=np.uint8)
    array[16:48, 16:48] = high
    return Image.fromarray(array)


def test_canny_finds_the_edges_of_a_square():
    edges = np.asarray(canny(square()))[..., 0] > 0
    assert edges.any()
    rows, cols = np.nonzero(edges)
    assert rows.min() >= 14 and rows.max() <= 49 and cols.min() >= 14 and cols.max() <= 49  # on the square's border
    assert not edges[20:44, 20:44].any() and not edges[:12].any()  # nothing inside or far outside
    for line in (edges[32], edges[:, 32]):  # each crossing of the square meets two thin edges
        runs = np.diff(np.flatnonzero(line))
        assert 1 <= (runs > 1).sum() + 1 <= 2 and line.sum() <= 4
    assert edges[16:48, 15:17].any(axis=1).all()  # the left edge is whole


def test_canny_thresholds_are_respected():
    # A step of 20 grey levels gives a Sobel L1 magnitude of 80 (4 * 20): under a low threshold of 100, no edge.
    assert not (np.asarray(canny(square(low=100, high=120))) > 0).any()
    # A step of 30 gives 120 along the sides and at most 180 at the corners: weak for 100/200, with no strong
    # pixel for hysteresis to start from, so none is kept...
    assert not (np.asarray(canny(square(low=100, high=130))) > 0).any()
    # ...and strong for 100/110.
    assert (np.asarray(canny(square(low=100, high=130), low=100, high=110)) > 0).any()
    smoothed = np.asarray(canny(square(), smooth=True))[..., 0] > 0
    assert smoothed[32].sum() >= 2


def test_invert_and_resize_modes():
    image = Image.fromarray(np.full((20, 40, 3), 10, dtype=np.uint8))
    assert np.asarray(preprocess(image, "invert")).min() == 245
    assert fit_image(image, 32, 32, "resize").size == (32, 32)
    cropped = fit_image(square(), 32, 16, "crop")
    assert cropped.size == (32, 16)
    wide = Image.new("RGB", (40, 20), (200, 0, 0))
    filled = np.asarray(fit_image(wide, 40, 40, "fill"))
    assert filled.shape == (40, 40, 3) and (filled[0, 0] == (200, 0, 0)).all()  # borders take the edge colour
    hint = hint_tensor(square())
    assert hint.shape == (1, 3, 64, 64) and hint.max() == 1.0 and hint.min() == 0.0


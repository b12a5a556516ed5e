"""Z-Image and Flux.2 klein files stored as fp8 (`float8_e4m3fn`): the transformer in its original names (with and
without ComfyUI's prefix) and the Qwen3 text encoder as `qwen_3_4b_fp8*.safetensors`. Their op-layer weights (the
transformer's and Qwen3's Linears) stay fp8 where the memory engine keeps them and the op layer casts each at its call,
so the latents equal diffusers' on the same fp8-rounded weights upcast to fp32, in every memory mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX
from tests.family_models import save
from tests.test_flux_fp8 import FP8, op_layer_weights, rounded, to_fp8

pytestmark = pytest.mark.skipif(FP8 is None, reason="this torch build has no torch.float8_e4m3fn")
diffusers = pytest.importorskip("diffusers")

TRANSFORMER, QWEN = "model.diffusion_model.", "text_encoders.qwen3."


def held_fp8(pipe) -> dict[str, torch.Tensor]:
    """The op-layer weights of the transformer and the Qwen3 tower, under the model's keys."""
    model = pipe.model
    return {**op_layer_weights(model.model.diffusion_model, TRANSFORMER), **op_layer_weights(model.text_encoders.qwen3, QWEN)}


def check_fp8_placement(pipe) -> None:
    stored = held_fp8(pipe)
    assert len(stored) > 20 and set(pipe.storage.native) == set(stored)
    assert {weight.dtype for weight in stored.values()} == {FP8}  # no 32-bit copy of a Linear weight, in either part
    assert any(key.startswith(QWEN) for key in stored)


# --- Z-Image ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zimage_fp8(tmp_path_factory):
    """The tiny Z-Image with its transformer and Qwen3 written as fp8, and the reference modules rounded alike."""
    from tests.test_zimage_net import original_tensors
    from tests.zimage_models import build

    model = build(tmp_path_factory.mktemp("zimage_fp8"))
    files = dict(model.files)
    files["transformer"] = save(to_fp8(original_tensors(model.transformer.state_dict())), model.root / "z_image_turbo_fp8.safetensors")
    files["qwen"] = save(to_fp8(model.qwen.state_dict()), model.root / "qwen_3_4b_fp8_e4m3fn.safetensors")
    return dataclasses.replace(model, transformer=rounded(model.transformer), qwen=rounded(model.qwen), files=files)


def test_zimage_fp8_files_equal_diffusers_on_rounded_weights_and_stay_fp8(zimage_fp8):
    from tests.test_zimage_pipeline import close, ours, reference_latents

    pipe = zimage_fp8.load()
    close(ours(pipe, steps=3).latents, reference_latents(zimage_fp8, 3, 0.0))  # Turbo's default: no CFG pass
    check_fp8_placement(pipe)


def test_zimage_fp8_comfy_prefix_equals_original_names(zimage_fp8, tmp_path):
    from safetensors.torch import load_file

    from tests.test_zimage_pipeline import ours

    tensors = load_file(str(zimage_fp8.files["transformer"]))
    comfy = save({COMFY_TRANSFORMER_PREFIX + k: v for k, v in tensors.items()}, tmp_path / "z_image_turbo_fp8_comfy.safetensors")
    files = {**zimage_fp8.files, "transformer": comfy}
    pipe = dataclasses.replace(zimage_fp8, files=files).load()
    assert torch.equal(ours(pipe, steps=2).latents, ours(zimage_fp8.load(), steps=2).latents)
    assert pipe.model.model.diffusion_model.x_embedder.weight.dtype == FP8


@pytest.mark.parametrize("mode", ["stream", "turbo"])
def test_zimage_fp8_memory_modes_equal_full(zimage_fp8, mode):
    from tests.test_zimage_pipeline import ours

    full = ours(zimage_fp8.load(), steps=2).latents
    pipe = zimage_fp8.load(memory=mode)
    other = ours(pipe, steps=2).latents
    assert torch.allclose(other, full, atol=1e-5), (other - full).abs().max()
    host = [slot for group in pipe.engine.groups.values() for slot in group.slots if slot.key in pipe.storage.native]
    assert any(slot.key.startswith(QWEN) for slot in host) and {slot.placed_dtype for slot in host} == {FP8}


# --- Flux.2 klein -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_fp8(tmp_path_factory):
    from tests.test_flux2_net import bfl_tensors
    from tests.test_flux2_pipeline import klein_model

    model = klein_model(tmp_path_factory.mktemp("klein_fp8"))
    files = dict(model.files)
    files["transformer"] = save(to_fp8(bfl_tensors(model.transformer.state_dict())), model.root / "flux-2-klein-4b-fp8.safetensors")
    files["qwen3"] = save(to_fp8(model.qwen.state_dict()), model.root / "qwen_3_4b_fp8_e4m3fn.safetensors")
    return dataclasses.replace(model, transformer=rounded(model.transformer), qwen=rounded(model.qwen), files=files)


@pytest.mark.parametrize("prefix", ["", COMFY_TRANSFORMER_PREFIX], ids=["bfl", "comfy"])
def test_klein_fp8_files_equal_diffusers_on_rounded_weights_and_stay_fp8(klein_fp8, prefix, tmp_path):
    from safetensors.torch import load_file

    from tests.test_flux2_pipeline import ours, reference_latents, vae_latents

    checkpoint = klein_fp8.files["transformer"]
    if prefix:
        tensors = {prefix + k: v for k, v in load_file(str(checkpoint)).items()}
        checkpoint = save(tensors, tmp_path / "flux-2-klein-4b-fp8-comfy.safetensors")
    pipe = klein_fp8.load(checkpoint)
    latents = vae_latents(klein_fp8, ours(pipe, steps=3).latents)
    expected = reference_latents(klein_fp8, True, 3, 4.0)
    assert torch.allclose(latents, expected, atol=1e-4), (latents - expected).abs().max()
    check_fp8_placement(pipe)


def test_klein_fp8_stream_equals_full(klein_fp8):
    from tests.test_flux2_pipeline import ours

    full = ours(klein_fp8.load(), steps=2).latents
    pipe = klein_fp8.load(memory="stream")
    other = ours(pipe, steps=2).latents
    assert torch.allclose(other, full, atol=1e-5), (other - full).abs().max()
    host = [slot for group in pipe.engine.groups.values() for slot in group.slots if slot.key in pipe.storage.native]
    assert any(slot.key.startswith(QWEN) for slot in host) and {slot.placed_dtype for slot in host} == {FP8}

"""Z-Image and Flux.2 klein files stored as fp8 (`float8_e4m3fn`): the transformer in its original names (with and
without ComfyUI's prefix) and the Qwen3 text encoder as `qwen_3_4b_fp8*.safetensors`. Their op-layer weights (the
transformer's and Qwen3's Linears) stay fp8 where the memory engine keeps them and the op layer casts each at its call,
so the latents equal diffusers' on the same fp8-rounded weights upcast to fp32, in every memory mode."""

from __future__ import annotations

import copy
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


# --- ComfyUI's mixed precision (`qwen_3_4b_fp8_mixed`, `*_fp8mixed`) ----------------------------------------------


def comfy_mixed(state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI's mixed-precision layout: each 2-D weight (a Linear; `skip`: an embedding) as fp8 of weight / s with its
    per-tensor `weight_scale` s, an `input_scale` and the `comfy_quant` marker; the rest unchanged. Returns the file's
    tensors and the weights they compute with."""
    import json

    marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    tensors, computed = {}, {}
    for key, value in state.items():
        if not key.endswith(".weight") or value.dim() != 2 or key.startswith(skip):
            tensors[key] = computed[key] = value
            continue
        layer, scale = key.removesuffix(".weight"), value.abs().max().float() / 448
        tensors[key] = (value / scale).to(FP8)
        tensors.update({f"{layer}.weight_scale": scale, f"{layer}.input_scale": torch.ones(()), f"{layer}.comfy_quant": marker.clone()})
        computed[key] = tensors[key].float() * scale
    return tensors, computed


@pytest.fixture(scope="module")
def zimage_mixed(tmp_path_factory):
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from tests.test_zimage_net import original_tensors
    from tests.zimage_models import build

    model = build(tmp_path_factory.mktemp("zimage_mixed"))
    transformer, transformer_weights = comfy_mixed(original_tensors(model.transformer.state_dict(), COMFY_TRANSFORMER_PREFIX))
    qwen, qwen_weights = comfy_mixed(model.qwen.state_dict(), skip=("embed_tokens",))
    files = {**model.files, "transformer": save(transformer, model.root / "z_image_turbo_fp8mixed.safetensors"),
             "qwen": save(qwen, model.root / "qwen_3_4b_fp8_mixed.safetensors")}  # fmt: skip
    reference = copy.deepcopy(model.transformer)
    reference.load_state_dict(convert_z_image_transformer_checkpoint_to_diffusers(transformer_weights))
    qwen_reference = copy.deepcopy(model.qwen)
    qwen_reference.load_state_dict(qwen_weights)
    return dataclasses.replace(model, transformer=reference, qwen=qwen_reference, files=files)


def test_zimage_comfy_mixed_fp8_equals_diffusers_on_the_scaled_weights(zimage_mixed):
    from tests.test_zimage_pipeline import close, ours, reference_latents

    pipe = zimage_mixed.load()
    close(ours(pipe, steps=3).latents, reference_latents(zimage_mixed, 3, 0.0))
    check_fp8_placement(pipe)
    assert set(pipe.storage.native_scaled) == set(pipe.storage.native)
    layer = pipe.model.text_encoders.qwen3.transformer.layers[0].self_attn.q_proj
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (layer.weight.shape[0],)
    assert pipe.loaded.report.known_extras["ComfyUI fp8 scale or marker"] > 0
    other = ours(zimage_mixed.load(memory="stream"), steps=3).latents
    assert torch.allclose(other, ours(pipe, steps=3).latents, atol=1e-5)


def test_klein_comfy_mixed_fp8_equals_diffusers_on_the_scaled_weights(tmp_path):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from tests.test_flux2_net import bfl_tensors
    from tests.test_flux2_pipeline import klein_model, ours, reference_latents, vae_latents

    model = klein_model(tmp_path)
    transformer, weights = comfy_mixed(bfl_tensors(model.transformer.state_dict()))
    qwen, qwen_weights = comfy_mixed(model.qwen.state_dict(), skip=("model.embed_tokens", "lm_head"))
    files = {**model.files, "transformer": save(transformer, tmp_path / "flux-2-klein-4b-fp8mixed.safetensors"),
             "qwen3": save(qwen, tmp_path / "qwen_3_4b_fp8_mixed.safetensors")}  # fmt: skip
    model.transformer.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(weights))
    model.qwen.load_state_dict(qwen_weights)
    model = dataclasses.replace(model, files=files)
    pipe = model.load()
    latents = vae_latents(model, ours(pipe, steps=3).latents)
    expected = reference_latents(model, True, 3, 4.0)
    assert torch.allclose(latents, expected, atol=1e-4), (latents - expected).abs().max()
    check_fp8_placement(pipe)


@pytest.mark.parametrize(("marker", "problem"), [
    ({"format": "nvfp4"}, r"is ComfyUI quantized with format 'nvfp4', which this version does not read"),
    ({"format": "float8_e4m3fn", "convrot": True}, r"is ComfyUI quantized with format 'float8_e4m3fn', which"),
    (None, r"weight_scale scales a weight that is not fp8"),
])  # fmt: skip
def test_other_comfy_quant_layers_are_refused_in_one_line(zimage_mixed, tmp_path, marker, problem):
    import json

    from safetensors.torch import load_file

    from optimized_sd.errors import UserError

    tensors = load_file(str(zimage_mixed.files["transformer"]))
    layer = COMFY_TRANSFORMER_PREFIX + "layers.0.attention.out"
    if marker is None:
        tensors[f"{layer}.weight"] = tensors[f"{layer}.weight"].float()
    else:
        tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(marker).encode()), dtype=torch.uint8)
    path = save(tensors, tmp_path / "z_image_other.safetensors")
    with pytest.raises(UserError, match=problem) as caught:
        dataclasses.replace(zimage_mixed, files={**zimage_mixed.files, "transformer": path}).load()
    assert "\n" not in str(caught.value)

"""Flux.1 files stored as fp8 (`float8_e4m3fn`): BFL's transformer with `t5xxl_fp8_e4m3fn` beside it, and ComfyUI's
all-in-one. Their op-layer weights stay fp8 where the memory engine keeps them and the op layer casts each at its
call, so the images equal diffusers' on the same fp8-rounded weights upcast to fp32, in every memory mode."""

from __future__ import annotations

import copy

import pytest
import torch

from optimized_sd.errors import CheckpointError
from optimized_sd.models.ops import WeightOp
from optimized_sd.pipelines.diffusion import load
from optimized_sd.pipelines.weight_storage import plan_storage
from optimized_sd.weights.flux_keys import COMFY_T5_PREFIX, COMFY_TRANSFORMER_PREFIX
from tests.family_models import save
from tests.test_flux_net import bfl_tensors
from tests.test_flux_pipeline import TinyFlux, build, ours, reference_latents, t5_file_state

FP8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = pytest.mark.skipif(FP8 is None, reason="this torch build has no torch.float8_e4m3fn")


def to_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every floating tensor as fp8, as the fp8 releases store them (norms and biases included)."""
    return {key: value.to(FP8) if value.is_floating_point() else value for key, value in state.items()}


def rounded(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose floating tensors are the fp8 rounding of its own, upcast (the reference's weights)."""
    copied = copy.deepcopy(module)
    copied.load_state_dict({key: value.to(FP8).float() for key, value in module.state_dict().items()})
    return copied


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> TinyFlux:
    """The tiny dev model with its transformer and T5 written as fp8, and the reference modules rounded alike."""
    model = build(tmp_path_factory.mktemp("flux_fp8") / "dev", "dev")
    files = dict(model.files)
    files["transformer"] = save(to_fp8(bfl_tensors(model.transformer.state_dict())), model.root / "flux1-dev-fp8.safetensors")
    files["t5"] = save(to_fp8(t5_file_state(model.t5)), model.root / "t5xxl_fp8_e4m3fn.safetensors")
    return TinyFlux(model.variant, model.root, rounded(model.transformer), model.vae, model.clip, rounded(model.t5), files,
                    model.clip_tokenizer, model.t5_tokenizer)  # fmt: skip


def op_layer_weights(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{path}.weight": layer.weight for path, layer in module.named_modules() if isinstance(layer, WeightOp)}


def test_fp8_files_equal_diffusers_on_rounded_weights_and_stay_fp8(fp8):
    pipe = fp8.load()
    result = ours(pipe, steps=3, guidance=2.5)
    expected = reference_latents(fp8, 3, 2.5)
    assert torch.allclose(result.latents, expected, atol=1e-4), (result.latents - expected).abs().max()
    transformer = pipe.model.model.diffusion_model
    t5 = pipe.model.text_encoders.t5xxl
    stored = {**op_layer_weights(transformer, "model.diffusion_model."), **op_layer_weights(t5, "text_encoders.t5xxl.")}
    assert len(stored) > 40 and set(pipe.storage.native) == set(stored)
    # placed as the file holds them: no 32-bit copy of a Linear weight, in the transformer and in T5 alike
    assert {weight.dtype for weight in stored.values()} == {FP8}
    fp8_params = sum(weight.numel() for weight in op_layer_weights(transformer, "").values())
    all_params = sum(p.numel() for p in transformer.parameters())
    assert pipe.memory.sizes.unet == fp8_params + (all_params - fp8_params) * 4
    # an fp8 weight stays fp8 whatever --weights asks; the rest follows --weights
    with_bf16 = plan_storage(pipe.model, "bf16", torch.float32, "cpu", pipe.loaded.source)
    assert set(with_bf16.native) == set(stored) and not set(with_bf16.stored) & set(stored) and with_bf16.stored


def test_fp8_all_in_one_equals_separate_files(fp8, tmp_path):
    from safetensors.torch import load_file

    aio = {COMFY_TRANSFORMER_PREFIX + k: v for k, v in load_file(str(fp8.files["transformer"])).items()}
    aio.update({COMFY_T5_PREFIX + k: v for k, v in load_file(str(fp8.files["t5"])).items()})
    aio.update({"text_encoders.clip_l.transformer." + k: v for k, v in fp8.clip.state_dict().items()})
    aio.update({"vae." + k: v for k, v in fp8.vae.state_dict().items()})
    path = save(aio, tmp_path / "flux1-dev-fp8-aio.safetensors")
    from_aio = load(path, tokenizer=(fp8.clip_tokenizer, fp8.t5_tokenizer), device="cpu", precision="full", memory="full")
    assert torch.equal(ours(from_aio, steps=2).latents, ours(fp8.load(), steps=2).latents)
    assert from_aio.model.model.diffusion_model.img_in.weight.dtype == FP8


@pytest.mark.parametrize("mode", ["stream", "turbo", "split"])
def test_fp8_memory_modes_equal_full(fp8, mode):
    full = ours(fp8.load(), steps=2).latents
    pipe = fp8.load(memory=mode)
    other = ours(pipe, steps=2).latents
    assert torch.allclose(other, full, atol=1e-5), (other - full).abs().max()
    host = [slot for group in pipe.engine.groups.values() for slot in group.slots if slot.key in pipe.storage.native]
    assert host and {slot.placed_dtype for slot in host} == {FP8}


def test_scaled_fp8_file_is_refused_in_one_line(fp8, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(fp8.files["transformer"]))
    tensors["scaled_fp8"] = torch.zeros(2, dtype=FP8)
    tensors["img_in.scale_weight"] = torch.ones(())
    path = save(tensors, tmp_path / "flux1-dev-fp8-scaled.safetensors")
    with pytest.raises(CheckpointError, match=r"ComfyUI scaled fp8 file \('scaled_fp8'.*\.scale_weight.*does not read") as caught:
        load(path, vae=fp8.files["vae"], text_encoders=(fp8.files["clip"], fp8.files["t5"]), device="cpu", precision="full")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("mode", ["full", "stream"])
def test_lora_on_fp8_weights_equals_lora_on_the_rounded_weights(fp8, tmp_path, mode):
    """A LoRA patches the dequantised fp8 weight at each call (`weight_patch`): the same as on a 32-bit file of the
    same rounded values, where the engine patches the placed weight."""
    import dataclasses

    pytest.importorskip("peft")
    from tests.test_flux_lora import WEIGHT, kohya_tensors, peft_tensors, request

    lora = save(kohya_tensors(peft_tensors(fp8)), tmp_path / "lora.safetensors")
    files = dict(fp8.files)
    files["transformer"] = save(bfl_tensors(fp8.transformer.state_dict()), tmp_path / "flux1-dev-rounded.safetensors")
    files["t5"] = save(t5_file_state(fp8.t5), tmp_path / "t5xxl-rounded.safetensors")
    expected = dataclasses.replace(fp8, files=files).load().generate(request(loras={lora: WEIGHT})).latents
    pipe = fp8.load(memory=mode)
    plain = pipe.generate(request()).latents
    result = pipe.generate(request(loras={lora: WEIGHT})).latents
    assert torch.allclose(result, expected, atol=1e-5), (result - expected).abs().max()
    assert (result - plain).abs().max() > 1e-3
    assert pipe.model.model.diffusion_model.img_in.weight.dtype == FP8 or mode == "stream"

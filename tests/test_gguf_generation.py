"""Generating from GGUF files: tiny Flux.1, SDXL and SD 1.5 models built with diffusers' classes, written as GGUF by
the `gguf` package (Q8_0, Q4_0, Q5_1, F16 and K-quant blocks) in ComfyUI-GGUF's layout (`general.architecture`, the
denoiser alone, SD weights reshaped to (n/256, 256) with `comfy.gguf.orig_shape.*`) and stable-diffusion.cpp's (no
metadata, the source checkpoint's names and shapes), give the latents diffusers gives with the same dequantised
weights; memory modes equal `full`; a LoRA patches the dequantised weights; bad files are one-line errors.

Blocks never span rows (every quantized row is a whole number of blocks), so quantizing diffusers' separate q, k, v
and concatenating their bytes is the GGUF of BFL's fused qkv: the files are written through the same renaming as
the safetensors tests (`bfl_tensors`), applied to bytes."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from optimized_sd.errors import UserError
from optimized_sd.pipelines.diffusion import load
from tests.test_flux_net import bfl_tensors
from tests.test_flux_pipeline import TinyFlux, build, ours, reference_latents
from tests.test_gguf import F16_FIELDS, random_blocks

gguf = pytest.importorskip("gguf")
diffusers = pytest.importorskip("diffusers")
Q = gguf.GGMLQuantizationType

FLUX_STEPS, GUIDANCE = 3, 2.5
BLOCK = re.compile(r"(double_blocks|transformer_blocks|single_blocks|single_transformer_blocks)\.(\d+)\.")
K_TYPES = {"img_mlp.2.weight": "Q4_K", "ff.net.2.weight": "Q4_K", "txt_mlp.2.weight": "Q6_K", "ff_context.net.2.weight": "Q6_K"}


# --- writing GGUF files ---------------------------------------------------------------------------------------
def encode(values: torch.Tensor, qtype: str, seed: int) -> np.ndarray:
    """`values` (2-D: rows of whole blocks) as GGUF bytes of `qtype` (F32/F16: the floats themselves). K-quants,
    which the package cannot quantize, are random blocks with small scales (their values are what they decode to)."""
    if qtype in F16_FIELDS and qtype.endswith("_K"):
        raw = random_blocks(qtype, values.shape[0], values.shape[1], seed)
        for start in F16_FIELDS[qtype]:
            raw.reshape(-1, gguf.GGML_QUANT_SIZES[Q[qtype]][1])[:, start : start + 2] = np.array([2e-4], np.float16).view(np.uint8)
        return raw
    return gguf.quants.quantize(values.float().numpy(), Q[qtype])


def decode(raw: np.ndarray, qtype: str) -> torch.Tensor:
    """What the `gguf` package reads the bytes as (float32)."""
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, Q[qtype]), dtype=np.float32).copy())


def write(path: Path, tensors: dict[str, tuple[np.ndarray, str]], arch: str | None, **arrays: list[int]) -> Path:
    """A GGUF file: name -> (bytes or floats, type); `arch` None writes no `general.architecture` (sd.cpp's files)."""
    writer = gguf.GGUFWriter(str(path), arch=arch or "none")
    if arch is None:
        writer.kv_data[0].pop("general.architecture")
    for key, shape in arrays.items():
        writer.add_array(key, shape)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array), raw_dtype=Q[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- Flux.1 -------------------------------------------------------------------------------------------------
def flux_type(key: str, shape: tuple[int, ...]) -> str:
    """Each block's 2-D weights in one type (diffusers' q, k and v become one fused BFL weight), a K-quant for the
    MLP outputs (256 wide), F32 for 1-D tensors and the embedders and final layer (as ComfyUI-GGUF keeps them)."""
    block = BLOCK.match(key)
    if block is None or len(shape) != 2:
        return "F32"
    for suffix, qtype in K_TYPES.items():
        if key.endswith("." + suffix):
            return qtype
    index = int(block.group(2))
    return ("Q8_0", "Q4_0")[index] if "double" in block.group(1) or block.group(1) == "transformer_blocks" else ("Q5_1", "F16")[index]


@dataclasses.dataclass
class FluxGguf:
    files: dict[str, Path]  # "city96", "sdcpp"
    dequantised: TinyFlux  # the tiny model with the weights the files decode to
    types: set[str]


def write_flux_gguf(model: TinyFlux, folder: Path) -> FluxGguf:
    """The transformer as GGUF in both layouts, and the diffusers model holding what the blocks decode to."""
    state = model.transformer.state_dict()
    encoded, decoded = {}, {}
    for index, (key, value) in enumerate(state.items()):
        qtype = flux_type(key, tuple(value.shape))
        raw = encode(value, qtype, index) if qtype != "F32" else value.float().numpy()
        encoded[key] = torch.from_numpy(np.ascontiguousarray(raw))
        decoded[key] = decode(raw, qtype).reshape(value.shape) if qtype != "F32" else value.float()
    transformer = copy.deepcopy(model.transformer)
    transformer.load_state_dict(decoded)
    bfl = bfl_tensors(encoded)  # concatenated byte rows: the fused weights' blocks
    tensors = {key: (value.numpy(), flux_type(key, (0, 0) if value.dim() == 2 else (0,))) for key, value in bfl.items()}
    files = {
        "city96": write(folder / "flux1-dev-mixed.gguf", tensors, "flux"),
        "sdcpp": write(folder / "flux1-dev-sdcpp.gguf", {"model.diffusion_model." + k: v for k, v in tensors.items()}, None),
    }
    return FluxGguf(files, dataclasses.replace(model, transformer=transformer), {qtype for _, qtype in tensors.values()})


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> tuple[TinyFlux, FluxGguf]:
    root = tmp_path_factory.mktemp("gguf-flux")
    model = build(root / "dev", "dev")
    return model, write_flux_gguf(model, root)


def load_flux(model: TinyFlux, path: Path, **options):
    options = {"device": "cpu", "precision": "full", "memory": "full", "tokenizer": (model.clip_tokenizer, model.t5_tokenizer), **options}
    return load(path, vae=model.files["vae"], text_encoders=(model.files["clip"], model.files["t5"]), **options)


@pytest.mark.parametrize("layout", ["city96", "sdcpp"])
def test_flux_gguf_latents_equal_diffusers_on_the_dequantised_weights(flux, layout):
    model, written = flux
    assert {"Q8_0", "Q4_0", "Q5_1", "F16", "Q4_K", "Q6_K", "F32"} <= written.types
    pipe = load_flux(model, written.files[layout])
    assert len(pipe.storage.gguf) > 10 and all(key.startswith("model.diffusion_model.") for key in pipe.storage.gguf)
    layer = pipe.model.get_submodule(pipe.storage.gguf[0].removesuffix(".weight"))
    assert layer.weight.dtype == torch.uint8 and layer.gguf_quant is not None  # the blocks, not a float copy
    result = ours(pipe, steps=FLUX_STEPS, guidance=GUIDANCE).latents
    expected = reference_latents(written.dequantised, FLUX_STEPS, GUIDANCE)
    assert torch.allclose(result, expected, atol=1e-4), (result - expected).abs().max()
    original = reference_latents(model, FLUX_STEPS, GUIDANCE)
    assert (original - expected).abs().max() > 1e-3  # the quantization shows: the comparison is with the right weights


@pytest.mark.parametrize("mode", ["stream", "turbo", "split"])
def test_flux_gguf_memory_modes_equal_full(flux, mode):
    model, written = flux
    full = ours(load_flux(model, written.files["city96"]), steps=2, guidance=GUIDANCE).latents
    other = ours(load_flux(model, written.files["city96"], memory=mode), steps=2, guidance=GUIDANCE).latents
    assert torch.allclose(other, full, atol=1e-5), (other - full).abs().max()  # as the safetensors modes (batching differs)


def test_flux_gguf_lora_patches_the_dequantised_weights(flux, tmp_path):
    """A LoRA on the GGUF transformer equals diffusers' fused LoRA on the dequantised weights."""
    from tests.family_models import save
    from tests.test_flux_lora import WEIGHT, peft_tensors

    model, written = flux
    lora = save(peft_tensors(written.dequantised), tmp_path / "flux_lora.safetensors")
    fused = dataclasses.replace(written.dequantised, transformer=copy.deepcopy(written.dequantised.transformer),
                                clip=copy.deepcopy(model.clip))  # fmt: skip
    pipeline = fused.diffusers_pipeline()
    pipeline.load_lora_weights(str(lora), adapter_name="gguf")
    pipeline.fuse_lora(components=["transformer", "text_encoder"], lora_scale=WEIGHT)
    pipeline.unload_lora_weights()
    expected = reference_latents(fused, FLUX_STEPS, GUIDANCE)
    for mode in ("full", "stream"):
        pipe = load_flux(model, written.files["city96"], memory=mode)
        result = ours(pipe, steps=FLUX_STEPS, guidance=GUIDANCE, loras={lora: WEIGHT}).latents
        assert torch.allclose(result, expected, atol=1e-4), (mode, (result - expected).abs().max())


def test_flux_gguf_needs_its_other_parts(flux):
    model, written = flux
    with pytest.raises(UserError, match="--vae"):
        load(written.files["city96"], text_encoders=(model.files["clip"], model.files["t5"]), device="cpu")

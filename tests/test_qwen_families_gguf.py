"""Z-Image and Flux.2 klein from GGUF files as ComfyUI-GGUF writes them: the transformer in its original names under
`general.architecture` "lumina2" (Z-Image; ComfyUI-GGUF names no Z-Image architecture) or "flux" (Flux.2), or without
metadata under ComfyUI's prefix (stable-diffusion.cpp's), and the Qwen3 text encoder as a llama.cpp GGUF ("qwen3",
llama.cpp's tensor names). Tiny models quantized (Q8_0, Q4_0, Q5_1, F16) give the latents diffusers gives with the
same dequantised weights; the quantized weights stay blocks in the op layers (the transformer's and Qwen3's
Linears); `stream` equals `full`; a Lumina 2 GGUF is refused in one line."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX
from tests.test_gguf_generation import decode, encode, write

gguf = pytest.importorskip("gguf")
diffusers = pytest.importorskip("diffusers")

TYPES = ("Q8_0", "Q4_0", "Q5_1", "F16")
TRANSFORMER, QWEN = "model.diffusion_model.", "text_encoders.qwen3."
# transformers' Qwen3 names -> llama.cpp's, as llama.cpp's converter writes them (the test's side of the map)
LLAMA_CPP = (
    ("model.embed_tokens.", "token_embd."), ("model.norm.", "output_norm."), ("lm_head.", "output."), ("model.layers.", "blk."),
    ("input_layernorm", "attn_norm"), ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
)  # fmt: skip


def quantized(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """Each 2-D tensor whose rows are whole blocks in one of `TYPES` in turn, the rest F32: (name -> (bytes, type)
    for `write`, name -> what the bytes decode to)."""
    encoded, decoded = {}, {}
    for index, (key, value) in enumerate(tensors.items()):
        qtype = TYPES[index % len(TYPES)] if value.dim() == 2 and value.shape[1] % 32 == 0 else "F32"
        raw = encode(value, qtype, index) if qtype != "F32" else value.float().numpy()
        encoded[key] = (raw, qtype)
        decoded[key] = decode(raw, qtype).reshape(value.shape) if qtype != "F32" else value.float()
    return encoded, decoded


def with_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    copied = copy.deepcopy(module)
    copied.load_state_dict(state)
    return copied


def qwen3_gguf(qwen: torch.nn.Module, path: Path) -> torch.nn.Module:
    """`qwen` (transformers' Qwen3Model or Qwen3ForCausalLM) written as a llama.cpp GGUF; returns it dequantised."""
    state = qwen.state_dict()
    prefix = "" if any(key.startswith("model.") for key in state) else "model."
    encoded, decoded = quantized({prefix + key: value for key, value in state.items()})
    renamed = {}
    for key, value in encoded.items():
        for ours, theirs in LLAMA_CPP:
            key = key.replace(ours, theirs)
        renamed[key] = value
    assert all(key.startswith(("blk.", "token_embd.", "output")) for key in renamed)
    write(path, renamed, "qwen3")
    return with_state(qwen, {key.removeprefix(prefix): value for key, value in decoded.items()})


def check_gguf_placement(pipe) -> None:
    """Quantized blocks held by the transformer's op layers and Qwen3's, never a float copy."""
    held = pipe.storage.gguf
    assert any(key.startswith(TRANSFORMER) for key in held) and any(key.startswith(QWEN) for key in held)
    for key in held:
        layer = pipe.model.get_submodule(key.removesuffix(".weight"))
        assert layer.weight.dtype == torch.uint8 and layer.gguf_quant is not None


# --- Z-Image ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zimage_gguf(tmp_path_factory):
    """The tiny Z-Image's transformer (both layouts) and Qwen3 as GGUF, with the reference holding what they decode to."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from tests.test_zimage_net import original_tensors
    from tests.zimage_models import build

    model = build(tmp_path_factory.mktemp("zimage_gguf"))
    encoded, decoded = quantized(original_tensors(model.transformer.state_dict()))
    files = {
        **model.files,
        "transformer": write(model.root / "z_image_turbo-Q4_0.gguf", encoded, "lumina2"),
        "sdcpp": write(model.root / "z_image_turbo-sdcpp.gguf", {COMFY_TRANSFORMER_PREFIX + k: v for k, v in encoded.items()}, None),
        "qwen": model.root / "Qwen3-4B-Q8_0.gguf",
    }
    qwen = qwen3_gguf(model.qwen, files["qwen"])
    transformer = with_state(model.transformer, convert_z_image_transformer_checkpoint_to_diffusers(decoded))
    return dataclasses.replace(model, transformer=transformer, qwen=qwen, files=files)


def load_zimage(model, checkpoint: Path, **options):
    from optimized_sd.pipelines.diffusion import load

    options = {"device": "cpu", "precision": "full", "memory": "full", "tokenizer": model.tokenizer, "vae": model.files["vae"],
               "text_encoders": (model.files["qwen"],), **options}  # fmt: skip
    return load(checkpoint, **options)


@pytest.mark.parametrize("layout", ["city96", "sdcpp"])
def test_zimage_gguf_latents_equal_diffusers_on_the_dequantised_weights(zimage_gguf, layout):
    from tests.test_zimage_pipeline import close, ours, reference_latents

    checkpoint = zimage_gguf.files["transformer" if layout == "city96" else "sdcpp"]
    pipe = load_zimage(zimage_gguf, checkpoint)
    assert pipe.config.family_name == "Z-Image"
    close(ours(pipe, steps=3).latents, reference_latents(zimage_gguf, 3, 0.0))
    check_gguf_placement(pipe)


def test_zimage_gguf_stream_equals_full(zimage_gguf):
    from tests.test_zimage_pipeline import ours

    full = ours(load_zimage(zimage_gguf, zimage_gguf.files["transformer"]), steps=2).latents
    other = ours(load_zimage(zimage_gguf, zimage_gguf.files["transformer"], memory="stream"), steps=2).latents
    assert torch.allclose(other, full, atol=1e-5), (other - full).abs().max()


def test_lumina2_and_text_gguf_files_are_refused_in_one_line(zimage_gguf, tmp_path):
    from optimized_sd.errors import UserError

    lumina = write(tmp_path / "lumina2-Q8_0.gguf", {"layers.0.adaLN_modulation.1.weight": (torch.zeros(4, 32).numpy(), "F32")}, "lumina2")
    with pytest.raises(UserError, match="architecture 'lumina2' holding Lumina 2 .* which this version does not run") as caught:
        load_zimage(zimage_gguf, lumina)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="text_encoders takes .*: it holds a Qwen3 text encoder, not a Z-Image or Flux.2 klein transformer"):
        load_zimage(zimage_gguf, zimage_gguf.files["qwen"])
    t5 = write(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf", {"enc.blk.0.attn_q.weight": (torch.zeros(4, 32).numpy(), "F32")}, "t5encoder")
    with pytest.raises(UserError, match=r"architecture 't5encoder' \(a T5 text encoder\), which this version does not run"):
        load_zimage(zimage_gguf, zimage_gguf.files["transformer"], text_encoders=(t5,))


# --- Flux.2 klein -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_gguf(tmp_path_factory):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from tests.test_flux2_net import bfl_tensors
    from tests.test_flux2_pipeline import klein_model

    model = klein_model(tmp_path_factory.mktemp("klein_gguf"))
    encoded, decoded = quantized(bfl_tensors(model.transformer.state_dict()))
    files = {**model.files, "transformer": write(model.root / "flux-2-klein-4b-Q4_0.gguf", encoded, "flux"),
             "qwen3": model.root / "Qwen3-4B-Q8_0.gguf"}  # fmt: skip
    qwen = qwen3_gguf(model.qwen, files["qwen3"])
    transformer = with_state(model.transformer, convert_flux2_transformer_checkpoint_to_diffusers(decoded))
    return dataclasses.replace(model, transformer=transformer, qwen=qwen, files=files)


def test_klein_gguf_latents_equal_diffusers_on_the_dequantised_weights(klein_gguf):
    from tests.test_flux2_pipeline import ours, reference_latents, vae_latents

    pipe = klein_gguf.load()
    assert pipe.config.family_name == "Flux.2 klein"
    latents = vae_latents(klein_gguf, ours(pipe, steps=3).latents)
    expected = reference_latents(klein_gguf, True, 3, 4.0)
    assert torch.allclose(latents, expected, atol=1e-4), (latents - expected).abs().max()
    check_gguf_placement(pipe)
    stream = klein_gguf.load(memory="stream")
    assert torch.allclose(ours(stream, steps=3).latents, ours(pipe, steps=3).latents, atol=1e-5)


def test_inspect_names_the_family_of_each_gguf(zimage_gguf, klein_gguf):
    from optimized_sd.weights.inspect import describe_checkpoint, format_info

    zimage = format_info(describe_checkpoint(zimage_gguf.files["transformer"], hashes=False))
    assert "zimage (Z-Image)" in zimage and "lumina2" in zimage and "Q4_0" in zimage
    assert "flux2-klein (Flux.2 klein)" in format_info(describe_checkpoint(klein_gguf.files["transformer"], hashes=False))
    qwen = format_info(describe_checkpoint(zimage_gguf.files["qwen"], hashes=False))
    assert "holds a Qwen3 text encoder (Z-Image, Flux.2 klein): give it with --text-encoder" in qwen

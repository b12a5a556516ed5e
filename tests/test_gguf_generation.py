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

from optimized_sd.errors import FieldError
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


def test_flux_gguf_parts_from_an_all_in_one_and_the_cli(flux, tmp_path, capsys):
    """`--parts-from` a ComfyUI all-in-one (its transformer not read) gives the separate files' image; the CLI writes
    it with the GGUF's hash; `inspect` names the family and the quant types."""
    from PIL import Image
    from safetensors.torch import load_file

    from optimized_sd.weights.hashing import sha256_short
    from tests.cli_runs import run_cli
    from tests.family_models import save

    model, written = flux
    prefixes = {"transformer": "model.diffusion_model.", "clip": "text_encoders.clip_l.transformer.",
                "t5": "text_encoders.t5xxl.transformer.", "vae": "vae."}  # fmt: skip
    whole = {prefix + key: value for part, prefix in prefixes.items() for key, value in load_file(str(model.files[part])).items()}
    all_in_one = save(whole, tmp_path / "flux1-dev-aio.safetensors")
    expected = ours(load_flux(model, written.files["city96"]), steps=2, guidance=GUIDANCE).latents
    pipe = load(written.files["city96"], parts_from=all_in_one, device="cpu", precision="full", memory="full",
                tokenizer=(model.clip_tokenizer, model.t5_tokenizer))  # fmt: skip
    assert torch.equal(ours(pipe, steps=2, guidance=GUIDANCE).latents, expected)
    code, out, err = run_cli(
        capsys, "txt2img", "--ckpt", written.files["city96"], "--parts-from", all_in_one, "--tokenizer", model.clip_tokenizer,
        "--tokenizer", model.t5_tokenizer, "--H", 64, "--W", 48, "--steps", 1, "--n_samples", 1, "--device", "cpu",
        "--precision", "full", "--max-sequence-length", 12, "--outdir", tmp_path / "out", "--skip_grid",
    )  # fmt: skip
    assert code == 0, err
    image = next((tmp_path / "out").rglob("*.png"))
    assert f"Model hash: {sha256_short(written.files['city96'])}" in Image.open(image).info["parameters"]
    code, out, err = run_cli(capsys, "inspect", written.files["city96"])
    assert code == 0 and "flux-dev (Flux.1 dev)" in out and "Q4_K" in out and "quant types" in out, (out, err)


def test_flux_gguf_needs_its_other_parts(flux):
    model, written = flux
    with pytest.raises(FieldError, match="Flux VAE") as caught:
        load(written.files["city96"], text_encoders=(model.files["clip"], model.files["t5"]), device="cpu")
    assert caught.value.field == "vae"  # the CLI says --vae


# --- SDXL and SD 1.5 ----------------------------------------------------------------------------------------
SD_TYPES = ("Q8_0", "Q4_0", "Q5_1", "F16", "Q4_K")
UNET = "model.diffusion_model."


def sd_layout_tensors(ldm: dict[str, torch.Tensor], city96: bool) -> tuple[dict, dict[str, list[int]], dict[str, torch.Tensor]]:
    """The UNet's tensors as GGUF (name -> (array, type)), the orig_shape arrays, and what each decodes to (LDM names).
    city96: names without the UNet prefix, tensors of >= 512 values whose innermost size is no multiple of 256 stored
    as (n/256, 256) (convs quantized so); sd.cpp: source names and shapes (a 3x3 conv cannot be quantized: F16)."""
    tensors, shapes, decoded = {}, {}, {}
    for index, (key, value) in enumerate(k for k in ldm.items() if k[0].startswith(UNET)):
        name = key.removeprefix(UNET) if city96 else key
        rows = value
        if city96 and value.dim() > 1 and value.numel() >= 512 and value.numel() % 256 == 0 and value.shape[-1] % 256:
            rows = value.reshape(-1, 256)
            shapes[f"comfy.gguf.orig_shape.{name}"] = list(value.shape)
        qtype = SD_TYPES[index % len(SD_TYPES)]
        block = gguf.GGML_QUANT_SIZES[Q[qtype]][0]
        if rows.dim() == 1 or value.numel() <= 1024 or rows.shape[-1] % block:
            qtype = "F16" if rows.dim() == 4 else "F32"
        raw = encode(rows.reshape(-1, rows.shape[-1]), qtype, index).reshape(*rows.shape[:-1], -1)
        tensors[name] = (raw, qtype)
        decoded[key] = decode(raw, qtype).reshape(value.shape)
    return tensors, shapes, decoded


def dequantised_unet(unet: torch.nn.Module, ldm: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of the diffusers UNet holding the decoded weights: each diffusers tensor is matched to its LDM
    tensor by value (random weights are unique), so no key table of ours is involved."""
    by_value = {}
    for name, value in unet.state_dict().items():
        matches = [key for key in decoded if ldm[key].shape.numel() == value.numel() and torch.equal(ldm[key].reshape(value.shape), value)]
        assert len(matches) == 1, (name, matches)
        by_value[name] = decoded[matches[0]].reshape(value.shape)
    copied = copy.deepcopy(unet)
    copied.load_state_dict(by_value)
    return copied


@dataclasses.dataclass
class SdGguf:
    files: dict[str, Path]
    unet: torch.nn.Module  # diffusers' UNet with the decoded weights of city96's file
    ldm: dict[str, torch.Tensor]
    types: set[str]
    decoded: dict[str, torch.Tensor]  # what city96's file decodes to, under LDM names
    sdcpp_unet: torch.nn.Module | None = None  # the same for sd.cpp's file (its convs F16, not reshaped and quantized)


def write_sd_gguf(checkpoint: Path, unet: torch.nn.Module, arch: str, folder: Path) -> tuple[SdGguf, dict[str, torch.Tensor]]:
    """The whole checkpoint's UNet as city96's GGUF (`arch`) and as sd.cpp's whole-model GGUF, and what sd.cpp's
    UNet decodes to (its convs are F16, not reshaped and quantized as city96's)."""
    from safetensors.torch import load_file

    ldm = load_file(str(checkpoint))
    city96, shapes, decoded = sd_layout_tensors(ldm, True)
    sdcpp, _, decoded_sdcpp = sd_layout_tensors(ldm, False)
    whole = {key: (value.float().numpy(), "F32") for key, value in ldm.items() if not key.startswith(UNET)}
    files = {"city96": write(folder / f"{arch}-unet.gguf", city96, arch, **shapes),
             "sdcpp": write(folder / f"{arch}-sdcpp.gguf", {**sdcpp, **whole}, None)}  # fmt: skip
    types = {qtype for _, qtype in city96.values()}
    return SdGguf(files, dequantised_unet(unet, ldm, decoded), ldm, types, decoded), decoded_sdcpp


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tiny_sdxl):
    folder = tmp_path_factory.mktemp("gguf-sdxl")
    written, decoded_sdcpp = write_sd_gguf(tiny_sdxl.files["converted"], tiny_sdxl.unet, "sdxl", folder)
    written.sdcpp_unet = dequantised_unet(tiny_sdxl.unet, written.ldm, decoded_sdcpp)
    from tests.family_models import hub_names, save

    clip_l, big_g = tiny_sdxl.text_encoders
    written.files["clip_l"] = save(hub_names(clip_l.state_dict()), folder / "clip_l.safetensors")
    written.files["clip_g"] = save(hub_names(big_g.state_dict()), folder / "clip_g.safetensors")
    vae = {key: value for key, value in written.ldm.items() if key.startswith("first_stage_model.")}
    written.files["vae"] = save(vae, folder / "sdxl_vae.safetensors")
    return tiny_sdxl, written


def sdxl_reference(model, unet) -> torch.Tensor:
    from tests.test_families_pipeline import SIZE, STEPS, diffusers_sdxl

    pipeline = diffusers_sdxl(dataclasses.replace(model, unet=unet), "euler", False)
    return pipeline("a red cube", num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(42),
                    output_type="latent", height=SIZE, width=SIZE).images  # fmt: skip


def load_sd(path: Path, model, **options):
    return load(path, device="cpu", precision="full", memory=options.pop("memory", "full"), tokenizer=model.tokenizer, **options)


@pytest.mark.parametrize("parts", ["parts_from", "flags", "sdcpp"])
def test_sdxl_gguf_latents_equal_diffusers_on_the_dequantised_weights(sdxl, parts):
    """city96's UNet with --parts-from, or with --vae and --text-encoder clip_l/clip_g (in either order); sd.cpp's
    whole model alone."""
    from tests.test_families_pipeline import close, request

    model, written = sdxl
    assert {"Q8_0", "Q4_0", "Q5_1", "F16", "Q4_K"} <= written.types
    if parts == "parts_from":
        pipe = load_sd(written.files["city96"], model, parts_from=model.files["converted"])
    elif parts == "flags":
        pipe = load_sd(written.files["city96"], model, vae=written.files["vae"],
                       text_encoders=(written.files["clip_g"], written.files["clip_l"]))  # fmt: skip
    else:
        pipe = load_sd(written.files["sdcpp"], model)
    assert pipe.config.family == "sdxl" and len(pipe.storage.gguf) > 10
    result = pipe.generate(request("euler"))
    unet = written.sdcpp_unet if parts == "sdcpp" else written.unet
    expected = sdxl_reference(model, unet)
    assert result.latents.abs().max() > 0.1
    assert close(result.latents, expected), (result.latents - expected).abs().max()
    original = sdxl_reference(model, model.unet)
    assert not close(original, expected)  # the quantization shows
    text = result.parameters[0].text()
    from optimized_sd.weights.hashing import sha256_short

    assert f"Model hash: {sha256_short(written.files['city96' if parts != 'sdcpp' else 'sdcpp'])}" in text


@pytest.mark.parametrize("mode", ["stream", "turbo", "split"])
def test_sdxl_gguf_memory_modes_equal_full(sdxl, mode):
    from tests.test_families_pipeline import request

    model, written = sdxl
    full = load_sd(written.files["city96"], model, parts_from=model.files["converted"]).generate(request("euler")).latents
    other = load_sd(written.files["city96"], model, parts_from=model.files["converted"], memory=mode).generate(request("euler")).latents
    assert torch.allclose(other, full, atol=1e-5), (other - full).abs().max()


@pytest.mark.parametrize("weights", [None, "int8"])
def test_sdxl_gguf_lora_equals_the_lora_on_the_dequantised_checkpoint(sdxl, tmp_path, weights):
    """A LoRA patches the GGUF layers' dequantised weights per call (`weight_patch`) as it patches the placed
    weights of a checkpoint holding the same values (the engine's hook); `--weights int8` stores the other layers."""
    from tests.family_models import save
    from tests.lora_files import peft_lora
    from tests.test_families_pipeline import close, request

    model, written = sdxl
    lora = save(peft_lora(model.unet, model.text_encoders, seed=4), tmp_path / "sdxl_lora.safetensors")
    checkpoint = save({**written.ldm, **written.decoded}, tmp_path / "sdxl-dequantised.safetensors")
    plain = load_sd(checkpoint, model).generate(request("euler")).latents
    expected = load_sd(checkpoint, model).generate(request("euler", loras={lora: 0.8})).latents
    pipe = load_sd(written.files["city96"], model, parts_from=model.files["converted"], memory="stream", weights=weights)
    assert pipe.storage.gguf and (weights is None or pipe.storage.stored)
    result = pipe.generate(request("euler", loras={lora: 0.8})).latents
    assert (expected - plain).abs().max() > 1e-2
    if weights is None:
        assert close(result, expected), (result - expected).abs().max()
    else:  # int8 rounding of the layers GGUF left in float (the embedders, 1x1 convs)
        assert (result - expected).norm() < 0.5 * (expected - plain).norm()


def test_sd15_gguf_latents_equal_diffusers(tmp_path, tiny_model):
    """city96's sd1 file, its other parts from the whole checkpoint, against diffusers' SD pipeline (Euler)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from tests.test_families_pipeline import SIZE, STEPS, close, request, scheduler

    written, _ = write_sd_gguf(tiny_model.safetensors, tiny_model.unet, "sd1", tmp_path)
    assert {"Q8_0", "Q4_0", "Q5_1"} <= written.types
    pipe = load(written.files["city96"], parts_from=tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu",
                precision="full", memory="full")  # fmt: skip
    assert pipe.config.family == "sd1"
    result = pipe.generate(request("euler")).latents
    reference = StableDiffusionPipeline(
        vae=tiny_model.vae, text_encoder=tiny_model.text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(tiny_model.tokenizer)),
        unet=written.unet, scheduler=scheduler("euler", "epsilon"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    expected = reference("a red cube", num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(42),
                         output_type="latent", height=SIZE, width=SIZE).images  # fmt: skip
    assert close(result, expected), (result - expected).abs().max()


def test_missing_parts_are_one_line_errors_naming_the_flag(sdxl, tiny_model):
    from optimized_sd.errors import FieldError

    model, written = sdxl
    from optimized_sd.cli import flag_words

    with pytest.raises(FieldError, match=r"must give the VAE of sdxl-unet.gguf, .*\(or parts_from") as caught:
        load_sd(written.files["city96"], model)
    assert flag_words(caught.value).startswith("--vae must give the VAE")  # what the CLI prints
    with pytest.raises(FieldError, match=r"must give clip_l and clip_g files for .*\(or parts_from") as caught:
        load_sd(written.files["city96"], model, vae=written.files["vae"])
    assert flag_words(caught.value).startswith("--text-encoder must give clip_l and clip_g files")
    with pytest.raises(FieldError, match="takes clip_l and clip_g files") as caught:
        load_sd(written.files["city96"], model, vae=written.files["vae"], text_encoders=(written.files["clip_l"],))
    assert caught.value.field == "text_encoders"
    with pytest.raises(FieldError, match="is an SD 1.x checkpoint; sdxl-unet.gguf is an SDXL denoiser") as caught:
        load_sd(written.files["city96"], model, parts_from=tiny_model.safetensors)
    assert caught.value.field == "parts_from"
    with pytest.raises(FieldError, match="holds its own VAE and text encoders"):
        load_sd(model.files["converted"], model, parts_from=model.files["converted"])


# --- bad input ----------------------------------------------------------------------------------------------
def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """A malformed or unusable GGUF of each kind the issue names -> (file, words its error must hold)."""
    from tests.test_gguf import MALFORMED

    files = {}
    for case in ("bad magic", "version 99", "huge tensor count", "offset past the end", "overlap", "IQ4_NL", "tensor past the end"):
        path = folder / f"{case.replace(' ', '_')}.gguf"
        path.write_bytes(MALFORMED[case][0])
        files[case] = (path, MALFORMED[case][1])
    rows = np.zeros((2, 32), np.float32)
    files["sd3"] = (write(folder / "sd3.gguf", {"joint_blocks.0.x_block.attn.qkv.weight": (rows, "F32")}, "sd3"),
                    "architecture 'sd3' (Stable Diffusion 3), which this version does not run")  # fmt: skip
    files["sdxl without a UNet"] = (write(folder / "empty-sdxl.gguf", {"w": (rows, "F32")}, "sdxl"), "holds no SDXL UNet")
    whole = (folder / "truncated.gguf")
    whole.write_bytes(files["sd3"][0].read_bytes()[:-40])
    files["truncated"] = (whole, "is truncated")
    return files


def test_bad_gguf_files_are_one_line_cli_errors_writing_nothing(tmp_path, capsys):
    from tests.cli_runs import run_cli
    from tests.test_gguf import MALFORMED

    assert "bad magic" in MALFORMED
    for case, (path, words) in bad_files(tmp_path).items():
        out = tmp_path / f"out-{path.stem}"
        code, _, err = run_cli(capsys, "txt2img", "--ckpt", path, "--outdir", out, "--H", "64", "--W", "64", "--ddim_steps", "1",
                               "--n_samples", "1", "--device", "cpu")  # fmt: skip
        assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and words in err, (case, err)
        assert not out.exists(), case

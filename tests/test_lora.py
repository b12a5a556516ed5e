"""LoRA files: every format's names resolve to our checkpoint keys, deltas and scales are right,
and bad files are refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_files import kohya_lora, lora_modules, peft_lora, save

from optimized_sd.config import TINY
from optimized_sd.errors import UserError
from optimized_sd.models.sd import LatentDiffusion
from optimized_sd.weights.lora import merge_into, read_lora
from optimized_sd.weights.sources import SafetensorsSource


@pytest.fixture(scope="module")
def model_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in LatentDiffusion(TINY).state_dict().items()}


@pytest.fixture(scope="module")
def ldm_weights(tiny_model) -> dict[str, torch.Tensor]:
    """The file's tensors under both spellings of CLIP keys (files say `text_model.`, newer transformers do not)."""
    source = SafetensorsSource(tiny_model.safetensors)
    tensors = {key: source.get(key).clone() for key in source.keys()}
    return {**tensors, **{key.replace(".transformer.text_model.", ".transformer."): value for key, value in tensors.items()}}


def expected_delta(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    if module.weight.dim() == 4:  # conv: sum over rank of up[o, r] * down[r, i, kh, kw]
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * scale
    return up @ down * scale


def check_mapping(lora, tiny_model, ldm_weights, tensors_by_module) -> None:
    """Every patch lands on the LDM key holding the diffusers module's (unique, random) weight."""
    assert len(lora.patches) == len(tensors_by_module)
    for module, down, up, scale in tensors_by_module:
        matches = [key for key, patch in lora.patches.items() if ldm_weights[key].shape == module.weight.shape
                   and torch.equal(ldm_weights[key], module.weight.detach())]  # fmt: skip
        assert len(matches) == 1
        (patch,) = lora.patches[matches[0]]
        torch.testing.assert_close(patch.delta(module.weight.shape, torch.device("cpu")), expected_delta(module, down, up, scale))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_kohya_locon_maps_every_module(tmp_path: Path, tiny_model, model_shapes, ldm_weights, suffix: str) -> None:
    tensors = kohya_lora(tiny_model.unet, tiny_model.text_encoder, rank=4, alpha=2.0)
    lora = read_lora(save(tensors, tmp_path / f"style{suffix}"), TINY, model_shapes)
    assert lora.name == "style"
    expected = []
    for tower, name, module in lora_modules(tiny_model.unet, tiny_model.text_encoder):
        base = ("lora_unet_" if tower == "unet" else "lora_te_") + name.replace(".", "_")
        expected.append((module, tensors[base + ".lora_down.weight"], tensors[base + ".lora_up.weight"], 2.0 / 4))
    check_mapping(lora, tiny_model, ldm_weights, expected)
    assert any(p.down.shape[1] == 9 * 32 for (p,) in lora.patches.values())  # a 3x3 LoCon conv is in there


def test_kohya_ldm_style_names_and_no_alpha(tmp_path: Path, model_shapes) -> None:
    """Some kohya files name UNet layers by their LDM path; without alpha the scale is 1."""
    down, up = torch.randn(2, 32, 1, 1), torch.randn(32, 2, 1, 1)
    path = save({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down,
                 "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up}, tmp_path / "ldm.safetensors")  # fmt: skip
    ((key, (patch,)),) = read_lora(path, TINY, model_shapes).patches.items()
    assert key == "model.diffusion_model.input_blocks.1.1.proj_in.weight" and patch.scale == 1.0


def test_peft_and_older_diffusers_names(tmp_path: Path, tiny_model, model_shapes, ldm_weights) -> None:
    tensors = peft_lora(tiny_model.unet, tiny_model.text_encoder, rank=3, attention_only=True)
    lora = read_lora(save(tensors, tmp_path / "peft.safetensors"), TINY, model_shapes)
    expected = []
    for tower, name, module in lora_modules(tiny_model.unet, tiny_model.text_encoder):
        key = ("unet." if tower == "unet" else "text_encoder.") + name
        if key + ".lora_A.weight" in tensors:
            expected.append((module, tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"], 1.0))
    check_mapping(lora, tiny_model, ldm_weights, expected)
    # diffusers' attention-processor and lora_linear_layer spellings reach the same layers
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    old = {f"{q}.processor.to_out_lora.down.weight": torch.randn(2, 32), f"{q}.processor.to_out_lora.up.weight": torch.randn(32, 2),
           "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight": torch.randn(2, 64),
           "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight": torch.randn(128, 2)}  # fmt: skip
    keys = set(read_lora(save(old, tmp_path / "old.safetensors"), TINY, model_shapes).patches)
    fc1 = next(k for k in model_shapes if k.startswith("cond_stage_model.") and k.endswith("layers.1.mlp.fc1.weight"))
    assert keys == {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight", fc1}


def test_merge_sums_loras_in_float32_and_rounds_once(tmp_path: Path, tiny_model, model_shapes, ldm_weights) -> None:
    a = read_lora(save(kohya_lora(tiny_model.unet, tiny_model.text_encoder, seed=1), tmp_path / "a.safetensors"), TINY, model_shapes)
    b_file = save(kohya_lora(tiny_model.unet, tiny_model.text_encoder, seed=2, alpha=None), tmp_path / "b.safetensors")
    b = read_lora(b_file, TINY, model_shapes)
    key = next(iter(a.patches))
    weight = ldm_weights[key].clone()
    assert merge_into(key, weight, [(a, 0.7), (b, -0.4)])
    cpu = torch.device("cpu")
    want = ldm_weights[key] + 0.7 * a.patches[key][0].delta(weight.shape, cpu) - 0.4 * b.patches[key][0].delta(weight.shape, cpu)
    torch.testing.assert_close(weight, want)
    half = ldm_weights[key].half()
    merge_into(key, half, [(a, 0.7), (b, -0.4)])
    total = a.patches[key][0].delta(weight.shape, cpu) * 0.7 + b.patches[key][0].delta(weight.shape, cpu) * -0.4
    assert torch.equal(half, (ldm_weights[key].half().float() + total).half())  # one rounding
    assert not merge_into("model.diffusion_model.out.2.bias", weight, [(a, 1.0)])


def test_bad_lora_files(tmp_path: Path, tiny_model, model_shapes) -> None:
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 768),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 2)}  # fmt: skip
    # CLIP-L under `lora_te1_` alone: SDXL's or Flux's (both name their CLIP-L so)
    refused = r"sdxl\.safetensors is (a Flux\.1 dev or SDXL|an SDXL or Flux\.1 dev) LoRA .*this model is SD 1\.x"
    with pytest.raises(UserError, match=refused):
        read_lora(save(sdxl, tmp_path / "sdxl.safetensors"), TINY, model_shapes)
    wide = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(2, 2048),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(32, 2)}  # fmt: skip
    with pytest.raises(UserError, match="SDXL LoRA .cross-attention width 2048"):
        read_lora(save(wide, tmp_path / "wide.safetensors"), TINY, model_shapes)
    tensors = kohya_lora(tiny_model.unet, tiny_model.text_encoder, text_too=False)
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.randn(2, 4)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.randn(4, 2)
    modules = len(tensors) // 3 + 1
    with pytest.raises(UserError, match=rf"1 of {modules} LoRA modules match no layer .*\({modules - 1} matched\)"):
        read_lora(save(tensors, tmp_path / "extra.safetensors"), TINY, model_shapes)
    with pytest.raises(UserError, match="not a LoRA file"):
        read_lora(save({"weight": torch.randn(2)}, tmp_path / "other.safetensors"), TINY, model_shapes)
    with pytest.raises(UserError, match="LoHa"):
        read_lora(save({"lora_unet_x.hada_w1_a": torch.randn(2)}, tmp_path / "loha.safetensors"), TINY, model_shapes)
    with pytest.raises(UserError, match="no such file"):
        read_lora(tmp_path / "missing.safetensors", TINY, model_shapes)


def diffusers_fused(tiny_model, path: Path, scale: float):
    """diffusers' own reading of the file: load_lora_weights + fuse_lora(lora_scale), on copies."""
    import copy

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        unet=copy.deepcopy(tiny_model.unet), vae=tiny_model.vae, text_encoder=copy.deepcopy(tiny_model.text_encoder),
        tokenizer=CLIPTokenizer.from_pretrained(str(tiny_model.tokenizer)), scheduler=EulerDiscreteScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    return pipe


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_merged_weights_equal_diffusers_fuse_lora(tmp_path: Path, tiny_model, model_shapes, ldm_weights, kind: str) -> None:
    from optimized_sd.weights.keymap import rename, unet_prefixes

    make = kohya_lora if kind == "kohya" else peft_lora
    path = save(make(tiny_model.unet, tiny_model.text_encoder), tmp_path / f"{kind}.safetensors")
    pipe = diffusers_fused(tiny_model, path, 0.7)
    fused = {"model.diffusion_model.": pipe.unet.state_dict(), "cond_stage_model.transformer.": pipe.text_encoder.state_dict()}
    fused = {prefix: {name.replace(".base_layer", ""): value for name, value in sd.items()} for prefix, sd in fused.items()}
    text = "cond_stage_model.transformer."  # transformers 5 saves CLIP without the `text_model.` level our tower has
    fused[text] = {name if name.startswith("text_model.") else f"text_model.{name}": value for name, value in fused[text].items()}
    ldm_to_diffusers = rename(fused["model.diffusion_model."], unet_prefixes(TINY.unet), "model.diffusion_model.")
    lora = read_lora(path, TINY, model_shapes)
    assert len(lora.patches) == len(lora_modules(tiny_model.unet, tiny_model.text_encoder))
    for key in lora.patches:
        merged = ldm_weights[key].clone()
        merge_into(key, merged, [(lora, 0.7)])
        if key.startswith("model.diffusion_model."):
            want = fused["model.diffusion_model."][ldm_to_diffusers[key]]
        else:
            want = fused["cond_stage_model.transformer."][key[len("cond_stage_model.transformer.") :]]
        torch.testing.assert_close(merged, want.reshape(merged.shape), atol=1e-6, rtol=1e-5)


def test_lora_names_options_and_hashes(tmp_path: Path) -> None:
    from optimized_sd.weights.hashing import extra_network_hash, sha256_file
    from optimized_sd.weights.lora import find_lora, parse_lora_option

    folder = tmp_path / "Lora"
    (folder / "styles").mkdir(parents=True)
    save({"a.lora_down.weight": torch.randn(2, 3)}, folder / "styles" / "WaterColor.safetensors")
    save({"a.lora_down.weight": torch.randn(2, 3)}, folder / "ink.pt")
    assert find_lora("WaterColor", folder).name == "WaterColor.safetensors"
    assert find_lora("watercolor", folder).name == "WaterColor.safetensors"
    with pytest.raises(UserError, match=r"<lora:watercolour>: no watercolour.safetensors/.pt/.ckpt in .*; nearest: WaterColor"):
        find_lora("watercolour", folder)
    with pytest.raises(UserError, match="holds no LoRA files"):
        find_lora("x", tmp_path / "empty")
    assert parse_lora_option("a/b.safetensors:0.6") == (Path("a/b.safetensors"), 0.6)
    assert parse_lora_option("b.safetensors") == (Path("b.safetensors"), 1.0)
    assert parse_lora_option("C:/x/b.pt") == (Path("C:/x/b.pt"), 1.0)
    with pytest.raises(UserError, match="not a number"):
        parse_lora_option("b.safetensors:strong")
    # A1111's hashes: addnet (data after the header) for safetensors LoRAs, plain sha256 otherwise
    import hashlib

    raw = (folder / "styles" / "WaterColor.safetensors").read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little") :]
    assert extra_network_hash(folder / "styles" / "WaterColor.safetensors", lora=True) == hashlib.sha256(data).hexdigest()[:12]
    assert extra_network_hash(folder / "ink.pt", lora=True) == sha256_file(folder / "ink.pt")[:12]


def test_lora_set_reads_each_file_once_and_says_when_the_set_changed(tmp_path: Path, tiny_model, model_shapes, ldm_weights) -> None:
    from optimized_sd.weights.lora import LoraSet

    path = save(kohya_lora(tiny_model.unet, tiny_model.text_encoder), tmp_path / "a.safetensors")
    loras = LoraSet(TINY, model_shapes)
    assert loras.activate({path: 0.5})
    first = loras.active[0][0]
    assert not loras.activate({path: 0.5})
    assert loras.activate({path: 0.8}) and loras.active[0][0] is first  # a new weight does not re-read the file
    key = next(iter(first.patches))
    weight = ldm_weights[key].clone()
    loras(key, weight)
    torch.testing.assert_close(weight, ldm_weights[key] + 0.8 * first.patches[key][0].delta(weight.shape, torch.device("cpu")))
    assert loras.activate({}) and loras.active == ()
    untouched = ldm_weights[key].clone()
    loras(key, untouched)
    assert torch.equal(untouched, ldm_weights[key])
    with pytest.raises(UserError, match="no such file"):
        loras.activate({tmp_path / "missing.safetensors": 1.0})

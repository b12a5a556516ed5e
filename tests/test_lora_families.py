"""LoRAs and embeddings on SD 2.x and SDXL (tiny models, fp32, CPU): every module of kohya (SDXL: LDM-named
UNet, as kohya's SDXL trainer writes it) and diffusers/peft files lands where diffusers' `load_lora_weights`
+ `fuse_lora` puts it, the OpenCLIP towers' q/k/v in their thirds of the fused in_proj; the latents equal
diffusers' in `full` and `stream`; another family's LoRA is refused by name; SDXL embedding pairs equal
diffusers' `load_textual_inversion` on both towers."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from family_models import openclip_state_dict
from lora_files import kohya_lora, lora_modules, peft_lora, save
from test_families import loaded_model, prompt_encoder

import optimized_sd
from optimized_sd.errors import UserError
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.weights.family import UNET_PREFIX
from optimized_sd.weights.keymap import rename, unet_prefixes
from optimized_sd.weights.lora import TEXT_TOWERS, merge_into, read_lora

TOLERANCE = 1e-4
STEPS = 2
FAMILIES = ("sd2", "sdxl")
PROMPT, NEGATIVE = "a red cube", "blurry"
WEIGHTS = {"kohya": 0.8, "peft": 0.3}  # the peft file (no alpha) at 0.6 moves SDXL latents by ~14: chaos amplifies rounding past 1e-4


def copied(model):
    """The FamilyModel with its own copies of the diffusers modules (diffusers' LoRA loading changes them)."""
    return dataclasses.replace(model, unet=copy.deepcopy(model.unet), text_encoders=[copy.deepcopy(t) for t in model.text_encoders])


def diffusers_fused(model, path: Path, weight: float):
    """diffusers' DDIM pipeline on copies of the modules, with the file loaded and fused at `weight`."""
    from test_families_pipeline import diffusers_sd2, diffusers_sdxl

    pipe = (diffusers_sd2 if model.family == "sd2" else diffusers_sdxl)(copied(model), "ddim", False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=weight)
    return pipe


def ldm_unet_names(model, config) -> dict[str, str]:
    """diffusers UNet module name -> its LDM name, as kohya's SDXL files name the UNet's modules."""
    weights = [name for name, _ in model.unet.named_parameters() if name.endswith(".weight")]
    return {
        d[: -len(".weight")]: ldm[len(UNET_PREFIX) : -len(".weight")]
        for ldm, d in rename(weights, unet_prefixes(config.unet), UNET_PREFIX).items()
    }


@pytest.fixture(scope="module")
def case(request, tiny_sd2, tiny_sdxl, tmp_path_factory):
    """One family (the test's parameter): its model, the loaded LDM model, and a kohya and a peft LoRA file
    (UNet + every text tower)."""
    model = tiny_sd2 if request.param == "sd2" else tiny_sdxl
    loaded = loaded_model(model, "real")
    folder = tmp_path_factory.mktemp(f"loras-{model.family}")
    unet_names = ldm_unet_names(model, loaded.config) if model.family == "sdxl" else None
    files = {
        "kohya": save(
            kohya_lora(model.unet, model.text_encoders, rank=4, alpha=2.0, seed=5, unet_names=unet_names),
            folder / "kohya_style.safetensors",
        ),
        "peft": save(peft_lora(model.unet, model.text_encoders, rank=3, seed=6), folder / "peft_style.safetensors"),
    }
    return model, loaded, files


@pytest.fixture(scope="module")
def fused(case) -> dict[str, object]:
    """diffusers' pipeline with each file fused at its weight (built once per family for both tests)."""
    model, _, files = case
    return {kind: diffusers_fused(model, files[kind], WEIGHTS[kind]) for kind in files}


def fused_ldm_weights(pipe, config) -> dict[str, torch.Tensor]:
    """Every weight of a fused diffusers pipeline under our LDM keys (OpenCLIP towers converted by the
    test's own conversion rules, q/k/v fused)."""
    unet = {name.replace(".base_layer", ""): value for name, value in pipe.unet.state_dict().items()}
    weights = {ldm: unet[d] for ldm, d in rename(unet, unet_prefixes(config.unet), UNET_PREFIX).items()}
    towers = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    for (prefix, kind), tower in zip(TEXT_TOWERS[config.family].values(), towers):
        state = {name.replace(".base_layer", ""): value for name, value in tower.state_dict().items()}
        if kind == "open_clip":
            state = openclip_state_dict(state)
        level = "" if kind == "open_clip" else "text_model."  # our CLIP tower has transformers 4's level; 5 saves without
        weights.update({prefix + level + name.removeprefix("text_model."): value for name, value in state.items()})
    return weights


@pytest.mark.parametrize("case", FAMILIES, indirect=True)
@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_merged_weights_equal_diffusers_fuse_lora(case, fused, kind: str) -> None:
    model, loaded, files = case
    base = loaded.model.state_dict()
    lora = read_lora(files[kind], loaded.config, {key: tuple(value.shape) for key, value in base.items()})
    assert sum(len(patches) for patches in lora.patches.values()) == len(lora_modules(model.unet, model.text_encoders))
    if model.family in ("sd2", "sdxl"):  # the OpenCLIP tower's q, k and v share one fused weight
        assert any(len(patches) == 3 for key, patches in lora.patches.items() if key.endswith("in_proj_weight"))
    want = fused_ldm_weights(fused[kind], loaded.config)
    for key in lora.patches:
        merged = base[key].clone()
        assert merge_into(key, merged, [(lora, WEIGHTS[kind])])
        torch.testing.assert_close(merged, want[key].reshape(merged.shape), atol=1e-6, rtol=1e-5)


# -- whole pipeline ---------------------------------------------------------------------------------
def request(**options) -> GenerationRequest:
    common = dict(negative_prompt=NEGATIVE, steps=STEPS, scale=7.5, sampler="ddim", seed=42, height=64, width=64)
    return GenerationRequest(prompts=[PROMPT], **common, **options)


@pytest.fixture(scope="module")
def references(fused) -> dict[str, torch.Tensor]:
    return {
        kind: pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=64,
            width=64,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(42),
            output_type="latent",
        ).images  # fmt: skip
        for kind, pipe in fused.items()
    }


# each family in one mode by default, the other two with the slow tests (the merge paths are the same)
@pytest.mark.parametrize(
    ("case", "mode"),
    [
        ("sd2", "full"),
        ("sdxl", "stream"),
        pytest.param("sd2", "stream", marks=pytest.mark.slow),
        pytest.param("sdxl", "full", marks=pytest.mark.slow),
    ],
    indirect=["case"],
)
def test_lora_latents_equal_diffusers(case, references, mode: str, monkeypatch) -> None:
    """`full` merges once into the resident copy; `stream` (every block split to parts, each tower by
    layer) merges into each unit's copy as it arrives."""
    from optimized_sd.pipelines import placement

    model, _, files = case
    monkeypatch.setattr(placement, "STREAM_UNIT_PARAMS", 1000)
    options = dict(prediction="v") if model.family == "sd2" else {}
    pipe = optimized_sd.load(model.files["real"], tokenizer=model.tokenizer, device="cpu", precision="full", memory=mode, **options)
    try:
        plain = pipe.generate(request()).latents
        kohya = pipe.generate(request(loras={files["kohya"]: WEIGHTS["kohya"]}))
        assert (kohya.latents - references["kohya"]).abs().max() <= TOLERANCE
        assert (kohya.latents - plain).abs().max() > 100 * TOLERANCE  # the LoRA did something
        peft = pipe.generate(request(loras={files["peft"]: WEIGHTS["peft"]})).latents
        assert (peft - references["peft"]).abs().max() <= TOLERANCE
        assert torch.equal(pipe.generate(request()).latents, plain)  # the original weights are back exactly
        assert 'Lora hashes: "kohya_style: ' in kohya.parameters[0].text()
    finally:
        pipe.close()


# -- another family's LoRA --------------------------------------------------------------------------
def factor_pair(module: str, down: tuple[int, ...], up: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_down.weight": torch.randn(*down), f"{module}.lora_up.weight": torch.randn(*up)}


def test_another_familys_lora_is_refused_by_name(tmp_path: Path, tiny_sd2, tiny_sdxl) -> None:
    sd2, sdxl = loaded_model(tiny_sd2, "real"), loaded_model(tiny_sdxl, "real")
    shapes = {name: {k: tuple(v.shape) for k, v in m.model.state_dict().items()} for name, m in (("sd2", sd2), ("sdxl", sdxl))}
    sdxl_file = save(kohya_lora(tiny_sdxl.unet, tiny_sdxl.text_encoders), tmp_path / "xl_style.safetensors")
    with pytest.raises(UserError, match=r"^xl_style\.safetensors is an SDXL LoRA \(it has lora_te1_\* keys\); this model is SD 2\.x$"):
        read_lora(sdxl_file, sd2.config, shapes["sd2"])
    sd2_file = save(kohya_lora(tiny_sd2.unet, tiny_sd2.text_encoders), tmp_path / "v2_style.safetensors")
    with pytest.raises(
        UserError, match=r"^v2_style\.safetensors is an SD 1\.x or SD 2\.x LoRA \(it has lora_te_\* keys\); this model is SDXL$"
    ):
        read_lora(sd2_file, sdxl.config, shapes["sdxl"])
    # real widths name the family: SD 2.x's 1024-wide text tower, SD 1.x's 768-wide cross-attention
    text_1024 = save(factor_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (4, 1024), (1024, 4)), tmp_path / "h.safetensors")
    with pytest.raises(UserError, match=r"^h\.safetensors is an SD 2\.x LoRA \(it has lora_te_\* keys\); this model is SDXL$"):
        read_lora(text_1024, sdxl.config, shapes["sdxl"])
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd1 = save(factor_pair(to_k, (4, 768), (320, 4)), tmp_path / "sd15.safetensors")
    for loaded, name in ((sd2, "SD 2\\.x"), (sdxl, "SDXL")):
        with pytest.raises(UserError, match=rf"^sd15\.safetensors is an SD 1\.x LoRA \(cross-attention width 768\); this model is {name}$"):
            read_lora(sd1, loaded.config, shapes[loaded.config.family])


def test_cli_refuses_an_sdxl_lora_on_sd2_in_one_line(capsys, tiny_sd2, tiny_sdxl, tmp_path: Path) -> None:
    from test_cli import run

    lora = save(peft_lora(tiny_sdxl.unet, tiny_sdxl.text_encoders), tmp_path / "xl.safetensors")
    out = tmp_path / "out"
    flags = ["--ckpt", str(tiny_sd2.files["real"]), "--tokenizer", str(tiny_sd2.tokenizer), "--device", "cpu", "--H", "64", "--W", "64"]
    code, _, err = run(capsys, "txt2img", *flags, "--ddim_steps", "1", "--prompt", "a cube", "--lora", str(lora), "--outdir", str(out))
    assert code == 1 and err.count("\n") == 1, err
    assert "xl.safetensors is an SDXL LoRA (it has text_encoder_2.* keys); this model is SD 2.x" in err
    assert not out.exists() or not any(out.rglob("*.png"))


# -- SDXL embeddings --------------------------------------------------------------------------------
def filled_tokenizer(source: Path, target: Path, vocab_size: int):
    """A copy of the byte tokenizer whose vocabulary fills the model's rows, so that diffusers appends an
    embedding's new tokens after them (as it does after CLIP's real 49408)."""
    from transformers import CLIPTokenizer

    folder = Path(shutil.copytree(source, target))
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab.update({f"<unused{i}>": i for i in range(vocab_size - 2) if i not in vocab.values()})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return CLIPTokenizer.from_pretrained(str(folder))


@torch.inference_mode()
def test_sdxl_embedding_pair_equals_diffusers_load_textual_inversion_on_both_towers(tmp_path: Path, tiny_sdxl) -> None:
    from safetensors.torch import save_file
    from test_families import diffusers_sdxl

    from optimized_sd.models.conditioner import size_conditioning
    from optimized_sd.weights.embeddings import EmbeddingLibrary

    clip_l, clip_g = (tower.config.hidden_size for tower in tiny_sdxl.text_encoders)
    vectors = {"clip_l": torch.randn(2, clip_l) * 0.5, "clip_g": torch.randn(2, clip_g) * 0.5}
    (tmp_path / "embeddings").mkdir()
    save_file(vectors, str(tmp_path / "embeddings" / "shiny.safetensors"))

    model = copied(tiny_sdxl)
    pipe = diffusers_sdxl(model)
    vocab = model.text_encoders[0].config.vocab_size
    pipe.tokenizer = filled_tokenizer(model.folder / "tokenizer", tmp_path / "tokenizer", vocab)
    pipe.tokenizer_2 = filled_tokenizer(model.folder / "tokenizer_2", tmp_path / "tokenizer_2", vocab)
    # diffusers' documented SDXL recipe: one load per tower, each with its half of the pair
    pipe.load_textual_inversion(vectors["clip_l"], token="shiny", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token="shiny", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a shiny cube", device="cpu", negative_prompt="shiny blur")

    encoder = prompt_encoder(tiny_sdxl, "real")
    encoder.embeddings = EmbeddingLibrary(tmp_path / "embeddings")
    cond, uncond, used = encoder.batch(["a shiny cube"], "shiny blur", 64, 96)
    assert used == {"shiny": tmp_path / "embeddings" / "shiny.safetensors"}
    assert (cond.context - embeds).abs().max() <= TOLERANCE
    assert (cond.y - size_conditioning(pooled, (64, 96, 0, 0, 64, 96))).abs().max() <= TOLERANCE
    assert (uncond.context - negative).abs().max() <= TOLERANCE and (
        uncond.y[:, : pooled.shape[-1]] - negative_pooled
    ).abs().max() <= TOLERANCE
    assert encoder.batch(["a shinyx cube"], None, 64, 96)[2] == {}  # only the whole word is the embedding

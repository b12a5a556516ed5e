"""Flux.1 LoRAs against diffusers' FluxPipeline `load_lora_weights` + `fuse_lora` on a tiny Flux (fp32, CPU): peft
names (q, k, v and proj_mlp onto rows of our fused layers, the final adaLN's swapped halves, CLIP-L), the same deltas
under kohya's and ai-toolkit's BFL names (q, k and v fused into one matrix), memory modes, `--weights`, `<lora:>` tags,
and the one-line errors for another family's or a mis-shaped LoRA."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from optimized_sd.config import TINY
from optimized_sd.errors import UserError
from optimized_sd.models.sd import LatentDiffusion
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.weights.flux_keys import DOUBLE_BLOCK_NAMES, FINAL_ADALN, SINGLE_BLOCK_NAMES, TOP_NAMES
from optimized_sd.weights.lora import read_lora
from tests.family_models import save
from tests.lora_files import TEXT_TARGETS, clip_module_name
from tests.test_flux_pipeline import PROMPT, SIZE, T5_LENGTH, TinyFlux, build, reference_latents

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

RANK = 2
WEIGHT = 0.8
STEPS = 3
# every Linear a full-coverage Flux LoRA trains (ai-toolkit's and SimpleTuner's widest presets), the embedders included
TRANSFORMER_TARGETS = re.compile(
    r"(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out|norm1(_context)?\.linear"
    r"|norm\.linear|norm_out\.linear|x_embedder|context_embedder|(timestep|text|guidance)_embedder\.linear_[12])$"
)


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> TinyFlux:
    return build(tmp_path_factory.mktemp("flux-lora") / "dev", "dev")


def linears(module: torch.nn.Module, pattern: re.Pattern) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(name)]


def peft_tensors(model: TinyFlux, seed: int = 3) -> dict[str, torch.Tensor]:
    """diffusers' own (peft) names: transformer.<module>.lora_A/lora_B.weight and text_encoder.<CLIP module>..."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, module, pattern in (("transformer", model.transformer, TRANSFORMER_TARGETS), ("text_encoder", model.clip, TEXT_TARGETS)):
        for name, linear in linears(module, pattern):
            name = clip_module_name(name) if prefix == "text_encoder" else name
            tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(RANK, linear.in_features, generator=generator) * 0.3
            tensors[f"{prefix}.{name}.lora_B.weight"] = torch.randn(linear.out_features, RANK, generator=generator) * 0.3
    return tensors


def bfl_factors(peft: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The peft file's transformer deltas as BFL modules' (down, up): modules fused in our layers become one LoRA of
    their summed rank (downs stacked, ups block-diagonal), the final adaLN's up halves swapped."""
    factors = {name[len("transformer.") : -len(".lora_A.weight")]: (down, peft[name.replace("lora_A", "lora_B")])
               for name, down in peft.items() if name.startswith("transformer.") and ".lora_A." in name}  # fmt: skip
    blocks = {int(m.group(2)): m.group(1) for name in factors if (m := re.match(r"((?:single_)?transformer_blocks)\.(\d+)\.", name))}
    tables = [("", "", TOP_NAMES)]
    for index in range(max(blocks) + 1):
        tables.append((f"double_blocks.{index}.", f"transformer_blocks.{index}.", DOUBLE_BLOCK_NAMES))
        tables.append((f"single_blocks.{index}.", f"single_transformer_blocks.{index}.", SINGLE_BLOCK_NAMES))
    result = {}
    for bfl_prefix, diffusers_prefix, table in tables:
        for bfl, parts in table:
            found = [factors[diffusers_prefix + part] for part in parts if diffusers_prefix + part in factors]
            if found:
                assert len(found) == len(parts)
                result[bfl_prefix + bfl] = (torch.cat([down for down, _ in found]), torch.block_diag(*[up for _, up in found]))
    down, up = factors[FINAL_ADALN[1]]
    result[FINAL_ADALN[0]] = (down, torch.cat(up.chunk(2)[::-1]))
    return result


def clip_factors(peft: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name[len("text_encoder.") : -len(".lora_A.weight")]: (down, peft[name.replace("lora_A", "lora_B")])
            for name, down in peft.items() if name.startswith("text_encoder.") and ".lora_A." in name}  # fmt: skip


def kohya_tensors(peft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya's sd-scripts names: lora_unet_<BFL module with _> (qkv as one matrix), lora_te1_<CLIP module with _>,
    with an alpha of twice the rank (the ups halved to give the same deltas)."""
    tensors = {}
    for prefix, table in (("lora_unet_", bfl_factors(peft)), ("lora_te1_", clip_factors(peft))):
        for name, (down, up) in table.items():
            base = prefix + name.replace(".", "_")
            tensors |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up / 2}
            tensors[f"{base}.alpha"] = torch.tensor(2.0 * down.shape[0])
    return tensors


def ai_toolkit_tensors(peft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL names under `diffusion_model.` with lora_A/lora_B (ai-toolkit's and ComfyUI-style files), CLIP-L as peft names it."""
    tensors = {key: value for key, value in peft.items() if key.startswith("text_encoder.")}
    for name, (down, up) in bfl_factors(peft).items():
        tensors |= {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up}
    return tensors


@pytest.fixture(scope="module")
def lora_files(dev, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("flux-loras")
    peft = peft_tensors(dev)
    return {
        "peft": save(peft, folder / "flux_peft.safetensors"),
        "kohya": save(kohya_tensors(peft), folder / "flux_kohya.safetensors"),
        "ai_toolkit": save(ai_toolkit_tensors(peft), folder / "flux_aitk.safetensors"),
    }


def request(**fields) -> GenerationRequest:
    fields = {"prompts": [PROMPT], **fields}
    return GenerationRequest(seed=42, height=SIZE[0], width=SIZE[1], max_sequence_length=T5_LENGTH, steps=STEPS, guidance=2.5, **fields)


def test_lora_latents_equal_diffusers_fused(dev, lora_files):
    """peft names through our fused rows (and CLIP-L at the same weight) equal diffusers' fused pipeline; kohya's and
    ai-toolkit's names of the same deltas give the same latents; without the LoRA the run is back exactly."""
    fused = dataclasses.replace(dev, transformer=copy.deepcopy(dev.transformer), clip=copy.deepcopy(dev.clip))
    pipeline = fused.diffusers_pipeline()
    pipeline.load_lora_weights(str(lora_files["peft"]), adapter_name="flux_peft")
    pipeline.fuse_lora(components=["transformer", "text_encoder"], lora_scale=WEIGHT)  # Flux fuses the transformer alone by default
    pipeline.unload_lora_weights()
    plain_reference = reference_latents(dev, STEPS, 2.5)
    expected = reference_latents(fused, STEPS, 2.5)
    assert (expected - plain_reference).abs().max() > 1e-2  # the LoRA moves the result (transformer and CLIP-L alike)

    pipe = dev.load()
    plain = pipe.generate(request()).latents
    results = {name: pipe.generate(request(loras={path: WEIGHT})).latents for name, path in lora_files.items()}
    assert torch.equal(pipe.generate(request()).latents, plain)
    assert torch.allclose(results["peft"], expected, atol=1e-4), (results["peft"] - expected).abs().max()
    for name in ("kohya", "ai_toolkit"):
        assert torch.allclose(results[name], results["peft"], atol=1e-5), (name, (results[name] - results["peft"]).abs().max())


def test_clip_part_is_applied(dev, lora_files, tmp_path):
    """A LoRA of CLIP-L alone changes the pooled vector, so the image (as A1111 and Forge apply it, at the LoRA's weight)."""
    peft = {key: value for key, value in peft_tensors(dev).items() if key.startswith("text_encoder.")}
    clip_only = save(peft, tmp_path / "clip_only.safetensors")
    pipe = dev.load()
    plain = pipe.generate(request()).latents
    assert not torch.allclose(pipe.generate(request(loras={clip_only: 1.0})).latents, plain, atol=1e-4)


@pytest.mark.parametrize(("mode", "weights"), [("stream", None), ("turbo", None), ("full", "bf16"), ("stream", "int8")])
def test_memory_modes_and_stored_weights_equal_full(dev, lora_files, mode, weights):
    """The tensor hook patches every placed (or dequantised) weight: each mode equals `full`, and stored weights move
    with the LoRA as far as full precision does (what is left is the storage's rounding)."""
    full = dev.load()
    expected_plain, expected = full.generate(request()).latents, full.generate(request(loras={lora_files["kohya"]: WEIGHT})).latents
    pipe = dev.load(memory=mode, weights=weights)
    plain = pipe.generate(request()).latents
    result = pipe.generate(request(loras={lora_files["kohya"]: WEIGHT})).latents
    assert torch.equal(pipe.generate(request()).latents, plain)
    if weights is None:
        assert torch.allclose(result, expected, atol=1e-5), (result - expected).abs().max()
    else:
        storage = (plain - expected_plain).norm()
        assert (result - expected).norm() < 3 * storage + 1e-3, ((result - expected).norm(), storage)
        assert (result - plain).norm() > 0.5 * (expected - expected_plain).norm()


def test_prompt_tag_and_cli_flag(dev, lora_files, tmp_path):
    """`<lora:NAME:W>` finds the file in --lora-dir and equals `--lora FILE:W`; the metadata lists its hash."""
    pipe = dev.load(lora_dir=lora_files["peft"].parent)
    tagged = pipe.generate(request(prompts=[f"{PROMPT} <lora:flux_peft:{WEIGHT}>"]))
    flagged = pipe.generate(request(loras=[f"{lora_files['peft']}:{WEIGHT}"]))
    assert torch.equal(tagged.latents, flagged.latents)
    assert 'Lora hashes: "flux_peft: ' in tagged.parameters[0].text()


def test_bad_loras_are_one_line_errors(dev, lora_files, tmp_path):
    pipe = dev.load()
    shapes = {key: tuple(value.shape) for key, value in pipe.model.state_dict().items()}
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd15 = save({f"{k}.lora_down.weight": torch.zeros(4, 768), f"{k}.lora_up.weight": torch.zeros(320, 4)}, tmp_path / "a.safetensors")
    with pytest.raises(UserError, match=r"^a\.safetensors is an SD 1\.x LoRA \(cross-attention width 768\); this model is Flux\.1 dev$"):
        pipe.generate(request(loras={sd15: 1.0}))
    sd_peft = save({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
                    "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)}, tmp_path / "b.safetensors")  # fmt: skip
    with pytest.raises(UserError, match=r"^b\.safetensors is an SD .*LoRA \(it has unet\.\* keys\); this model is Flux\.1 dev$"):
        read_lora(sd_peft, pipe.config, shapes)
    # after a refused LoRA the model runs as before
    assert torch.equal(pipe.generate(request()).latents, dev.load().generate(request()).latents)

    # schnell takes dev's LoRAs (the same tables), as long as they do not patch dev's guidance embedder
    schnell_shapes = {key: shape for key, shape in shapes.items() if ".guidance_in." not in key}
    no_guidance = {k: v for k, v in kohya_tensors(peft_tensors(dev)).items() if "guidance_in" not in k}
    schnell = dataclasses.replace(pipe.config, family="flux-schnell")
    assert read_lora(save(no_guidance, tmp_path / "d.safetensors"), schnell, schnell_shapes).patches
    with pytest.raises(UserError, match=r"^flux_kohya\.safetensors: 2 of \d+ LoRA modules match no layer of this Flux\.1 schnell model"):
        read_lora(lora_files["kohya"], schnell, schnell_shapes)

    with torch.device("meta"):
        sd_shapes = {key: tuple(value.shape) for key, value in LatentDiffusion(TINY).state_dict().items()}
    reasons = {"peft": r"it has transformer\.\* keys", "kohya": r"it has lora_te1_\* keys", "ai_toolkit": r"it has diffusion_model\..*"}
    for name, why in reasons.items():
        with pytest.raises(UserError, match=rf"^{lora_files[name].name} is a Flux\.1 dev LoRA \({why}\); this model is SD 1\.x$"):
            read_lora(lora_files[name], TINY, sd_shapes)
    unet_only = {k: v for k, v in kohya_tensors(peft_tensors(dev)).items() if k.startswith("lora_unet_")}
    with pytest.raises(UserError, match=r"is a Flux\.1 dev LoRA \(it has (single|double)_blocks_\d+\* modules\); this model is SD 1\.x$"):
        read_lora(save(unet_only, tmp_path / "unet_only.safetensors"), TINY, sd_shapes)

    wide = peft_tensors(dev)
    wide["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.zeros(128, RANK)
    with pytest.raises(UserError, match=r"to_k gives a \(128 x 64\) update for a layer of shape \(192, 64\) \(rows 64\.\.128\)"):
        read_lora(save(wide, tmp_path / "wide.safetensors"), pipe.config, shapes)
    q = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    t5 = save({f"{q}.lora_down.weight": torch.zeros(2, 32), f"{q}.lora_up.weight": torch.zeros(32, 2)}, tmp_path / "c.safetensors")
    with pytest.raises(UserError, match=r"^c\.safetensors: LoRA modules for the T5-XXL text encoder \(lora_te3_\*\) are not supported"):
        read_lora(t5, pipe.config, shapes)


def test_cli_lora_flag_and_one_line_refusal(dev, lora_files, tmp_path, capsys):
    from PIL import Image

    from tests.cli_runs import run_cli

    flags = ["txt2img", "--ckpt", dev.files["transformer"], "--vae", dev.files["vae"], "--text-encoder", dev.files["clip"],
             "--text-encoder", dev.files["t5"], "--tokenizer", dev.clip_tokenizer, "--tokenizer", dev.t5_tokenizer,
             "--H", 64, "--W", 48, "--steps", 2, "--seed", 1, "--device", "cpu", "--precision", "full",
             "--max-sequence-length", T5_LENGTH, "--skip_grid"]  # fmt: skip
    code, _, err = run_cli(capsys, *flags, "--lora", f"{lora_files['kohya']}:{WEIGHT}", "--outdir", tmp_path / "ok")
    assert code == 0, err
    assert 'Lora hashes: "flux_kohya: ' in Image.open(next((tmp_path / "ok").rglob("*.png"))).info["parameters"]
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd15 = save({f"{k}.lora_down.weight": torch.zeros(4, 768), f"{k}.lora_up.weight": torch.zeros(320, 4)}, tmp_path / "sd15.safetensors")
    code, _, err = run_cli(capsys, *flags, "--lora", sd15, "--outdir", tmp_path / "refused")
    assert code == 1 and err.strip().splitlines() == [
        "error: sd15.safetensors is an SD 1.x LoRA (cross-attention width 768); this model is Flux.1 dev"
    ], err
    assert not list((tmp_path / "refused").rglob("*.png"))

"""Z-Image LoRAs against diffusers' ZImagePipeline `load_lora_weights` + `fuse_lora` on a tiny Z-Image (fp32, CPU): peft
names (to_q, to_k and to_v onto the thirds of our fused qkv, the renamed embedder and final layer), the same deltas
under ComfyUI's original names (`diffusion_model.`, qkv as one matrix), `stream` equal to `full`, and a Qwen3 LoRA
refused in one line."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch

from optimized_sd.errors import UserError
from optimized_sd.pipelines.diffusion import GenerationRequest
from tests.family_models import save
from tests.zimage_models import PROMPT, SIZE, TinyZImage, build

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

RANK, WEIGHT, STEPS = 2, 0.8, 3
TARGETS = re.compile(r"(attention\.(to_[qkv]|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.[01]|t_embedder\.mlp\.[02]"
                     r"|cap_embedder\.1|all_x_embedder\.2-1|all_final_layer\.2-1\.linear)$")  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyZImage:
    return build(tmp_path_factory.mktemp("zimage-lora"))


def peft_tensors(model: TinyZImage, seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in model.transformer.named_modules():
        if isinstance(linear, torch.nn.Linear) and TARGETS.search(name):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, linear.in_features, generator=generator) * 0.1
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, RANK, generator=generator) * 0.1
    return tensors


def comfy_tensors(peft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same deltas under `diffusion_model.` + original names: q, k and v as one LoRA of their summed rank on qkv."""
    from optimized_sd.weights.zimage_keys import diffusers_transformer_recipes

    factors = {key[len("transformer.") : -len(".lora_A.weight")]: (down, peft[key.replace("lora_A", "lora_B")])
               for key, down in peft.items() if ".lora_A." in key}  # fmt: skip
    tensors = {}
    for original, (_, sources) in diffusers_transformer_recipes(f"{name}.weight" for name in factors).items():
        parts = [factors[source[: -len(".weight")]] for source in sources]  # q, k, v: one LoRA of their summed rank
        down, up = torch.cat([d for d, _ in parts]), torch.block_diag(*[u for _, u in parts])
        name = original[: -len(".weight")]
        tensors |= {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up}
    return tensors


def request(**fields) -> GenerationRequest:
    return GenerationRequest(prompts=[PROMPT], seed=42, height=SIZE[0], width=SIZE[1], steps=STEPS, **fields)


def test_lora_latents_equal_diffusers_fused(tiny, tmp_path):
    peft = peft_tensors(tiny)
    files = {"peft": save(peft, tmp_path / "z_peft.safetensors"), "comfy": save(comfy_tensors(peft), tmp_path / "z_comfy.safetensors")}
    fused = dataclasses.replace(tiny, transformer=copy.deepcopy(tiny.transformer))
    pipeline = fused.diffusers_pipeline()
    pipeline.load_lora_weights(str(files["peft"]), adapter_name="z_peft")
    pipeline.fuse_lora(components=["transformer"], lora_scale=WEIGHT)
    pipeline.unload_lora_weights()
    with torch.no_grad():
        expected = pipeline(prompt=PROMPT, height=SIZE[0], width=SIZE[1], num_inference_steps=STEPS, guidance_scale=0.0,
                            generator=torch.Generator("cpu").manual_seed(42), output_type="latent").images  # fmt: skip
    pipe = tiny.load()
    plain = pipe.generate(request()).latents
    assert (expected - plain).abs().max() > 1e-2  # the LoRA moves the result
    results = {name: pipe.generate(request(loras={path: WEIGHT})).latents for name, path in files.items()}
    assert torch.equal(pipe.generate(request()).latents, plain)
    assert torch.allclose(results["peft"], expected, atol=1e-4), (results["peft"] - expected).abs().max()
    assert torch.allclose(results["comfy"], results["peft"], atol=1e-5), (results["comfy"] - results["peft"]).abs().max()
    streamed = tiny.load(memory="stream").generate(request(loras={files["peft"]: WEIGHT})).latents
    assert torch.allclose(streamed, results["peft"], atol=1e-5)


def test_a_text_encoder_lora_is_refused(tiny, tmp_path):
    qwen = save({"text_encoder.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 32),
                 "text_encoder.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(48, 2)}, tmp_path / "qwen.safetensors")  # fmt: skip
    with pytest.raises(UserError, match="not supported"):
        tiny.load().generate(request(loras={qwen: 1.0}))

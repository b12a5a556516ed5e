"""Flux.2 klein through `load()` and the CLI, against diffusers' Flux2KleinPipeline on tiny random models (fp32, CPU):
txt2img latents of the distilled and the base model (CFG), the file layouts (BFL file, ComfyUI prefix, a diffusers
folder), memory modes, and the one-line errors for wrong files and requests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from optimized_sd.errors import FieldError, UserError
from optimized_sd.models.flux2 import denormalize_latents, unpatchify
from optimized_sd.pipelines.diffusion import GenerationRequest, load
from optimized_sd.pipelines.hires import HiresFix
from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX
from tests.cli_runs import run_cli
from tests.family_models import save
from tests.test_flux2_net import bfl_tensors, tiny_diffusers_flux2, tiny_diffusers_vae
from tests.test_zimage_net import tiny_qwen3, tiny_qwen_tokenizer

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red fox"
SIZE = (32, 24)  # (H, W): the tiny VAE downscales by 2, patches 2x2: 8x6 tokens
QWEN_WIDTH, KLEIN_LAYERS = 32, 28  # klein reads Qwen3 layers 9, 18 and 27


@dataclass
class TinyKlein:
    root: Path
    transformer: object
    vae: object
    qwen: object
    files: dict[str, Path]  # transformer (BFL names), qwen3, vae
    tokenizer: Path

    def load(self, checkpoint: Path | None = None, **options):
        options = {"device": "cpu", "precision": "full", "memory": "full", "tokenizer": self.tokenizer,
                   "vae": self.files["vae"], "text_encoders": (self.files["qwen3"],), **options}  # fmt: skip
        return load(checkpoint or self.files["transformer"], **options)

    def diffusers_pipeline(self, distilled: bool):
        from transformers import Qwen2Tokenizer

        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
        tokenizer = Qwen2Tokenizer.from_pretrained(str(self.tokenizer))
        return diffusers.Flux2KleinPipeline(scheduler=scheduler, vae=self.vae, text_encoder=self.qwen, transformer=self.transformer,
                                            tokenizer=tokenizer, is_distilled=distilled)  # fmt: skip


def klein_model(root: Path) -> TinyKlein:
    """Tiny random klein parts (Qwen3 with the 28 layers klein reads from) written as the files people download."""
    transformer = tiny_diffusers_flux2(seed=21, joint_attention_dim=3 * QWEN_WIDTH)
    vae, qwen = tiny_diffusers_vae(seed=22), tiny_qwen3(causal_lm=True, seed=23, layers=KLEIN_LAYERS)
    files = {
        "transformer": save(bfl_tensors(transformer.state_dict()), root / "flux-2-klein-tiny.safetensors"),
        "qwen3": save(qwen.state_dict(), root / "qwen_3_tiny.safetensors"),
        "vae": save(vae.state_dict(), root / "flux2-vae.safetensors"),
    }
    tiny_qwen_tokenizer(root / "tokenizer")
    return TinyKlein(root, transformer, vae, qwen, files, root / "tokenizer")


@pytest.fixture(scope="module")
def klein(tmp_path_factory) -> TinyKlein:
    return klein_model(tmp_path_factory.mktemp("klein"))


def ours(pipe, **fields):
    return pipe.generate(GenerationRequest(**{"prompts": [PROMPT], "seed": 42, "height": SIZE[0], "width": SIZE[1], **fields}))


def vae_latents(model: TinyKlein, latents: torch.Tensor) -> torch.Tensor:
    """Our latents (the transformer's) as the pipeline's `output_type="latent"`: denormalised and unpatchified."""
    bn = model.vae.bn
    return unpatchify(denormalize_latents(latents, bn.running_mean, bn.running_var, model.vae.config.batch_norm_eps))


def reference_latents(model: TinyKlein, distilled: bool, steps: int, guidance: float, seed: int = 42) -> torch.Tensor:
    with torch.no_grad():
        return model.diffusers_pipeline(distilled)(
            prompt=PROMPT, height=SIZE[0], width=SIZE[1], num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
        ).images


@pytest.mark.parametrize("distilled", [True, False], ids=["distilled", "base"])
def test_txt2img_latents_equal_diffusers(klein, distilled):
    """The distilled model in one pass (its scale ignored), the base with CFG against an empty negative prompt."""
    pipe = klein.load(distilled=None if distilled else False)  # the file's name says distilled; --base overrides
    assert pipe.config.family_name == ("Flux.2 klein" if distilled else "Flux.2 klein base")
    result = ours(pipe, steps=3, scale=None if distilled else 3.0)
    expected = reference_latents(klein, distilled, 3, 4.0 if distilled else 3.0)
    assert result.latents.shape == (1, 32, 8, 6)
    latents = vae_latents(klein, result.latents)
    assert latents.shape == expected.shape == (1, 8, 16, 12)
    assert torch.allclose(latents, expected, atol=1e-4), (latents - expected).abs().max()
    preview = pipe.preview(torch.randn(1, 128, 8, 6))  # the real model's 128 channels: one pixel per token, blown up 16x
    assert preview.size == (6 * 16, 8 * 16) and len(set(preview.tobytes())) > 1
    fields = result.parameters[0].text().splitlines()[-1]
    assert "Sampler: Euler" in fields and f"CFG scale: {1 if distilled else 3}," in fields
    request = pipe.with_defaults(GenerationRequest(prompts=[PROMPT]))
    with torch.no_grad():  # the text step (placed by `generate` above, resident in `full`)
        context = pipe.text_conditioning(request, [PROMPT], None)[0].context
        reference = klein.diffusers_pipeline(distilled).encode_prompt(PROMPT, device="cpu")[0]
    assert context.shape == reference.shape == (1, 512, 3 * QWEN_WIDTH)
    assert torch.allclose(context, reference, atol=1e-4), (context - reference).abs().max()
    # Qwen3's layers past the last one read (27 of 0..27 here) and its final norm are known and never read
    assert pipe.loaded.report.known_extras["Qwen3 layer past the last one read"] == 11
    assert len(pipe.model.text_encoders.qwen3.transformer.layers) == 27


def test_defaults_and_empirical_mu(klein):
    """Distilled: 4 Euler steps without CFG; base: the pipeline's 50 steps at 4; both 1024. The sigmas are the
    scheduler's for Flux2KleinPipeline's mu at 1024x1024 (4096 tokens) and 4 steps."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    pipe = klein.load()
    request = pipe.with_defaults(GenerationRequest(prompts=["x"], scale=5.0))
    assert (request.steps, request.sampler, request.scale, request.height, request.max_sequence_length) == (4, "euler", 1.0, 1024, 512)
    assert (request.latent_channels, request.downscale) == (32, 4)
    base = klein.load(distilled=False).with_defaults(GenerationRequest(prompts=["x"]))
    assert (base.steps, base.scale) == (50, 4.0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    for height, width, steps in ((256, 256, 4), (256, 256, 50), (360, 400, 28)):  # 4096 and 9000 tokens of 4x4 pixels
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(height * width // 16, steps))
        request = pipe.with_defaults(GenerationRequest(prompts=["x"], height=height, width=width, steps=steps))
        assert np.allclose(pipe.sampling_for(request).sigmas(steps), scheduler.sigmas.numpy(), atol=1e-6)


def test_layouts_give_identical_images(klein, tmp_path):
    """BFL names, ComfyUI's prefix and a diffusers folder (its model_index.json says distilled) load the same weights."""
    base = ours(klein.load(), steps=2).latents
    comfy = save({COMFY_TRANSFORMER_PREFIX + k: v for k, v in bfl_tensors(klein.transformer.state_dict()).items()},
                 tmp_path / "flux-2-klein-comfy.safetensors")  # fmt: skip
    assert torch.equal(ours(klein.load(comfy), steps=2).latents, base)
    folder = tmp_path / "FLUX.2-klein-tiny"
    klein.diffusers_pipeline(distilled=True).save_pretrained(str(folder))
    from_folder = load(folder, device="cpu", precision="full", memory="full")
    assert from_folder.config.family_name == "Flux.2 klein"
    assert torch.equal(ours(from_folder, steps=2).latents, base)


def test_scheduler_config_is_honoured(tmp_path):
    """A diffusers folder's scheduler config: dynamic shifting off gives diffusers' fixed-shift grid; a grid this
    sampler does not walk is a one-line error."""
    import json

    from optimized_sd.pipelines.flux2 import klein_flow

    (tmp_path / "scheduler").mkdir()
    config = {"shift": 2.0, "use_dynamic_shifting": False, "time_shift_type": "exponential"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6))
    assert np.allclose(klein_flow(tmp_path).sigmas(6), scheduler.sigmas.numpy(), atol=1e-6)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "use_karras_sigmas": True}))
    with pytest.raises(UserError, match="use_karras_sigmas is not supported for Flux.2 klein"):
        klein_flow(tmp_path)


@pytest.mark.parametrize("mode", ["stream", "split"])
def test_memory_modes_equal_full(klein, mode):
    full = ours(klein.load(distilled=False), steps=2, scale=2.0)
    other = ours(klein.load(distilled=False, memory=mode), steps=2, scale=2.0)
    assert torch.allclose(other.latents, full.latents, atol=1e-5), (other.latents - full.latents).abs().max()


@pytest.mark.parametrize("sampler", ["euler", "dpm2"])  # dpm2 also calls between the grid's sigmas
def test_hoisted_modulation_equals_per_call(klein, sampler):
    """`stream` moves the shared adaLN linears once per run and each block once per transformer call."""
    pipe = klein.load(memory="stream")
    hoisted = ours(pipe, steps=3, sampler=sampler).latents
    loads = [group for action, group, _ in pipe.engine.events if action == "load"]
    if sampler == "euler":
        assert (loads.count("unet.double_stream_modulation_img"), loads.count("unet.double_blocks.0")) == (1, 3)
    pipe.hoist_modulation = False
    plain = ours(pipe, steps=3, sampler=sampler).latents
    assert torch.allclose(hoisted, plain, atol=1e-5), (hoisted - plain).abs().max()


def test_wrong_files_and_requests_are_one_line_errors(klein, tmp_path):
    with pytest.raises(UserError, match="text_encoders takes .*: it holds a Qwen3 text encoder, not a Z-Image or Flux.2 klein transformer"):
        load(klein.files["qwen3"], device="cpu")
    with pytest.raises(UserError, match="vae must give Flux.2 klein's Flux.2 VAE, "):
        klein.load(vae=None)
    wide = tiny_diffusers_flux2(seed=24, joint_attention_dim=3 * 48)  # 9B's transformer beside 4B's Qwen3, in small
    mismatched = save(bfl_tensors(wide.state_dict()), tmp_path / "flux-2-klein-wide.safetensors")
    with pytest.raises(UserError, match="reads Qwen3 states 48 wide .* qwen_3_tiny.safetensors is 32 wide"):
        klein.load(mismatched)
    dev = tmp_path / "FLUX.2-dev"
    dev.mkdir()
    (dev / "model_index.json").write_text('{"_class_name": "Flux2Pipeline"}')
    with pytest.raises(UserError, match=r"Flux2Pipeline folder \(Flux.2 \[dev\]\), which this version does not run"):
        load(dev, device="cpu")
    image = Image.new("RGB", (SIZE[1], SIZE[0]))
    with pytest.raises(FieldError, match="txt2img only"):
        ours(klein.load(), steps=1, init_image=image)
    with pytest.raises(FieldError, match="multiple of 4"):
        ours(klein.load(), steps=1, height=30)
    steps = []
    with pytest.raises(FieldError) as refused:  # up front, not as an init image error at the second pass
        klein.load().generate(GenerationRequest(prompts=[PROMPT], seed=42, height=SIZE[0], width=SIZE[1], steps=1, hires=HiresFix()),
                              progress=steps.append)  # fmt: skip
    assert refused.value.field == "hires" and not steps
    assert str(refused.value) == "hires cannot run on Flux.2 klein, which has no img2img (the hires fix's second pass)"


def test_cli_txt2img_errors_and_inspect(klein, tmp_path, capsys):
    from optimized_sd.weights.inspect import describe_checkpoint, format_info

    flags = ["--vae", klein.files["vae"], "--text-encoder", klein.files["qwen3"], "--tokenizer", klein.tokenizer, "--H", 32, "--W", 24,
             "--steps", 2, "--n_samples", 1, "--seed", 1, "--device", "cpu", "--precision", "full", "--skip_grid"]  # fmt: skip
    checkpoint = klein.files["transformer"]
    code, out, err = run_cli(capsys, "txt2img", "--ckpt", checkpoint, "--base", "--scale", 2, *flags, "--outdir", tmp_path / "ok")
    assert code == 0, err
    assert "Flux.2 klein base" in out
    assert "CFG scale: 2," in Image.open(next((tmp_path / "ok").rglob("*.png"))).info["parameters"]
    code, out, err = run_cli(capsys, "txt2img", "--ckpt", klein.files["qwen3"], *flags, "--outdir", tmp_path / "bad")
    assert code == 1 and "--text-encoder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*.png"))
    text = format_info(describe_checkpoint(klein.files["transformer"], hashes=False))
    assert "Flux.2 klein" in text and "Flux.2 transformer" in text and "float32" in text
    assert "Qwen3 text encoder (--text-encoder)" in text and "Flux.2 VAE (--vae)" in text


def test_lora_latents_equal_diffusers_fused(klein, tmp_path):
    """A peft LoRA of every Linear of the transformer (q, k and v onto rows of our fused qkv, the final adaLN's
    swapped halves) equals diffusers' load_lora_weights + fuse_lora; without it the run is back exactly."""
    import copy
    import dataclasses

    pytest.importorskip("peft")
    generator = torch.Generator().manual_seed(31)
    tensors = {}
    for name, linear in klein.transformer.named_modules():
        if isinstance(linear, torch.nn.Linear):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(2, linear.in_features, generator=generator) * 0.3
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, 2, generator=generator) * 0.3
    path = save(tensors, tmp_path / "klein_peft.safetensors")
    fused = dataclasses.replace(klein, transformer=copy.deepcopy(klein.transformer))
    pipeline = fused.diffusers_pipeline(distilled=True)
    pipeline.load_lora_weights(str(path), adapter_name="klein_peft")
    pipeline.fuse_lora(lora_scale=0.8)
    pipeline.unload_lora_weights()
    expected = reference_latents(fused, True, 2, 1.0)
    assert (expected - reference_latents(klein, True, 2, 1.0)).abs().max() > 1e-2  # the LoRA moves the result
    pipe = klein.load()
    plain = ours(pipe, steps=2).latents
    result = vae_latents(klein, ours(pipe, steps=2, loras={path: 0.8}).latents)
    assert torch.allclose(result, expected, atol=1e-4), (result - expected).abs().max()
    assert torch.equal(ours(pipe, steps=2).latents, plain)

"""Flux.1 dev and schnell through `load()` and the CLI, against diffusers' FluxPipeline and FluxImg2ImgPipeline on
tiny random models (fp32, CPU): txt2img and img2img latents, the file layouts (BFL + separate files, ComfyUI's
all-in-one, a diffusers folder), memory modes, hoisted modulation, and the one-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from optimized_sd.errors import FieldError, UserError
from optimized_sd.models.flux import unpack_latents
from optimized_sd.pipelines.diffusion import GenerationRequest, InpaintOptions, load
from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX
from tests.cli_runs import run_cli
from tests.family_models import VOCAB, save, write_tokenizer
from tests.test_flux_net import bfl_tensors, perturbed, tiny_t5

diffusers = pytest.importorskip("diffusers")

PROMPT = "a cat on a dog"
SIZE = (64, 48)  # (H, W): latents 8x6, 12 tokens
T5_LENGTH = 12


def tiny_clip(seed: int = 9):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                            max_position_embeddings=77, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    return perturbed(CLIPTextModel(config), seed)


def tiny_vae(seed: int = 10):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32,) * 4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
    )
    return perturbed(vae, seed)


def tiny_transformer(guidance: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=64, axes_dims_rope=(4, 14, 14), guidance_embeds=guidance,
    )
    return perturbed(model, seed)


def write_t5_tokenizer(folder: Path) -> Path:
    from transformers import T5Tokenizer

    words = ["a", "cat", "dog", "on", "the", "red"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -float(i)) for i, w in enumerate(words)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(folder))
    return folder


@dataclass
class TinyFlux:
    variant: str
    root: Path
    transformer: object
    vae: object
    clip: object
    t5: object
    files: dict[str, Path]  # transformer, vae, clip, t5 files (BFL + separate)
    clip_tokenizer: Path
    t5_tokenizer: Path

    def load(self, **options):
        """Loaded from BFL + separate files through the flags' options."""
        options = {"device": "cpu", "precision": "full", "memory": "full", "tokenizer": (self.clip_tokenizer, self.t5_tokenizer), **options}
        return load(self.files["transformer"], vae=self.files["vae"], text_encoders=(self.files["clip"], self.files["t5"]), **options)

    def diffusers_pipeline(self, kind=None):
        from transformers import CLIPTokenizer, T5Tokenizer

        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0 if self.variant == "dev" else 1.0, use_dynamic_shifting=self.variant == "dev",
            base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        )
        kind = kind or diffusers.FluxPipeline
        return kind(
            scheduler=scheduler, vae=self.vae, text_encoder=self.clip, tokenizer=CLIPTokenizer.from_pretrained(str(self.clip_tokenizer)),
            text_encoder_2=self.t5, tokenizer_2=T5Tokenizer.from_pretrained(str(self.t5_tokenizer)), transformer=self.transformer,
        )


def t5_file_state(t5) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}


def build(root: Path, variant: str) -> TinyFlux:
    root.mkdir(parents=True, exist_ok=True)
    transformer, vae = tiny_transformer(variant == "dev"), tiny_vae()
    t5 = tiny_t5()
    clip = tiny_clip()
    files = {
        "transformer": save(bfl_tensors(transformer.state_dict()), root / f"flux1-{variant}.safetensors"),
        "vae": save(vae.state_dict(), root / "ae.safetensors"),
        "clip": save(clip.state_dict(), root / "clip_l.safetensors"),
        "t5": save(t5_file_state(t5), root / "t5xxl_fp16.safetensors"),
    }
    return TinyFlux(variant, root, transformer, vae, clip, t5, files, write_tokenizer(root / "clip_tok", False),
                    write_t5_tokenizer(root / "t5_tok"))  # fmt: skip


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> TinyFlux:
    return build(tmp_path_factory.mktemp("flux") / "dev", "dev")


@pytest.fixture(scope="module")
def schnell(tmp_path_factory) -> TinyFlux:
    return build(tmp_path_factory.mktemp("flux") / "schnell", "schnell")


def ours(pipe, **fields):
    request = GenerationRequest(prompts=[PROMPT], seed=42, height=SIZE[0], width=SIZE[1], max_sequence_length=T5_LENGTH, **fields)
    return pipe.generate(request)


def reference_latents(model: TinyFlux, steps: int, guidance: float, seed: int = 42, kind=None, **extra) -> torch.Tensor:
    pipeline = model.diffusers_pipeline(kind)
    with torch.no_grad():
        packed = pipeline(
            prompt=PROMPT, height=SIZE[0], width=SIZE[1], num_inference_steps=steps, guidance_scale=guidance,
            max_sequence_length=T5_LENGTH, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **extra,
        ).images
    return unpack_latents(packed, SIZE[0] // 8, SIZE[1] // 8)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_txt2img_latents_equal_diffusers(request, variant):
    model = request.getfixturevalue(variant)
    pipe = model.load()
    steps = 4 if variant == "dev" else 3
    result = ours(pipe, steps=steps, guidance=2.5 if variant == "dev" else None)
    expected = reference_latents(model, steps, 2.5 if variant == "dev" else 0.0)
    assert result.latents.shape == expected.shape == (1, 16, 8, 6)
    assert torch.allclose(result.latents, expected, atol=1e-4), (result.latents - expected).abs().max()
    text = result.parameters[0].text()
    fields = text.splitlines()[-1]
    family = "Flux.1 dev" if variant == "dev" else "Flux.1 schnell"
    assert pipe.config.family_name == family
    order = ["Steps", "Sampler", "Schedule type", "CFG scale"] + (["Distilled CFG Scale"] if variant == "dev" else []) + ["Seed", "Size"]
    assert [part.split(":")[0] for part in fields.split(", ")][: len(order)] == order
    assert "Sampler: Euler" in fields and "CFG scale: 1," in fields
    if variant == "dev":
        assert "Distilled CFG Scale: 2.5" in fields


def test_family_defaults_and_sigmas(dev, schnell):
    """dev: 28 Euler steps on the dynamically shifted linspace(1, 1/N, N); schnell: 4 unshifted; both scale 1."""
    pipe = dev.load()
    request = pipe.with_defaults(GenerationRequest(prompts=["x"], height=64, width=48))
    assert (request.steps, request.sampler, request.scale, request.guidance, request.max_sequence_length) == (28, "euler", 1.0, 3.5, 512)
    fast = schnell.load().with_defaults(GenerationRequest(prompts=["x"]))
    assert (fast.steps, fast.height, fast.guidance, fast.max_sequence_length) == (4, 1024, None, 256)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    import numpy as np

    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=0.5 + (1.15 - 0.5) / (4096 - 256) * (4096 - 256))
    sigmas = pipe.sampling_for(replace_size(request, 1024, 1024)).sigmas(28)
    assert np.allclose(sigmas, scheduler.sigmas.numpy(), atol=1e-6)


def replace_size(request, height, width):
    from dataclasses import replace

    return replace(request, height=height, width=width)


def test_img2img_latents_equal_diffusers(dev, monkeypatch):
    """FluxImg2ImgPipeline's step rounding and noising; its init latents are the posterior mean here (ours), so the
    reference's latent sampling is pinned to the mean."""
    import diffusers.pipelines.flux.pipeline_flux_img2img as img2img_module

    original = img2img_module.retrieve_latents
    def mean_latents(output, generator=None, sample_mode="sample"):
        return original(output, sample_mode="argmax")

    monkeypatch.setattr(img2img_module, "retrieve_latents", mean_latents)
    image = Image.fromarray((torch.rand(SIZE[0], SIZE[1], 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    pipe = dev.load()
    result = ours(pipe, steps=5, init_image=image, strength=0.55)
    expected = reference_latents(dev, 5, 3.5, kind=diffusers.FluxImg2ImgPipeline, image=image, strength=0.55)
    assert torch.allclose(result.latents, expected, atol=1e-4), (result.latents - expected).abs().max()


def test_layouts_give_identical_images(dev, tmp_path):
    """BFL + separate files, ComfyUI's all-in-one and a diffusers folder load the same weights."""
    base = ours(dev.load(), steps=2).latents
    aio = {COMFY_TRANSFORMER_PREFIX + k: v for k, v in bfl_tensors(dev.transformer.state_dict()).items()}
    aio.update({"text_encoders.clip_l.transformer." + k: v for k, v in dev.clip.state_dict().items()})
    aio.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5_file_state(dev.t5).items()})
    aio.update({"vae." + k: v for k, v in dev.vae.state_dict().items()})
    path = save(aio, tmp_path / "flux1-dev-aio.safetensors")
    from_aio = load(path, tokenizer=(dev.clip_tokenizer, dev.t5_tokenizer), device="cpu", precision="full", memory="full")
    assert torch.equal(ours(from_aio, steps=2).latents, base)
    folder = tmp_path / "FLUX.1-dev"
    dev.diffusers_pipeline().save_pretrained(str(folder))
    from_folder = load(folder, device="cpu", precision="full", memory="full")
    assert torch.equal(ours(from_folder, steps=2).latents, base)


@pytest.mark.parametrize("mode", ["stream", "turbo", "split"])
def test_memory_modes_equal_full(dev, mode):
    full = ours(dev.load(), steps=3, scale=2.0, negative_prompt="the red dog")
    other = ours(dev.load(memory=mode), steps=3, scale=2.0, negative_prompt="the red dog")
    assert torch.allclose(other.latents, full.latents, atol=1e-5), (other.latents - full.latents).abs().max()


@pytest.mark.parametrize("sampler", ["heun", "dpm2"])  # dpm2 also calls between the grid's sigmas
def test_hoisted_modulation_equals_per_call(dev, sampler):
    pipe = dev.load(memory="stream")
    hoisted = ours(pipe, steps=3, sampler=sampler).latents
    loads = [group for action, group, _ in pipe.engine.events if action == "load"]
    if sampler == "heun":  # the adaLN weights move once per run, every block once per transformer call (5 for Heun)
        assert (loads.count("unet.time_in"), loads.count("unet.double_blocks.0.img_norm1")) == (1, 5)
    pipe.hoist_modulation = False
    plain = ours(pipe, steps=3, sampler=sampler).latents
    assert torch.allclose(hoisted, plain, atol=1e-5), (hoisted - plain).abs().max()


def test_bad_requests_are_one_line_errors(dev, schnell, caplog):
    pipe = dev.load()
    with pytest.raises(FieldError, match="DDIM/PLMS need an eps/v schedule"):
        ours(pipe, steps=2, sampler="ddim")
    for value in (float("nan"), -1.0):
        with pytest.raises(FieldError, match="guidance"):
            ours(pipe, steps=2, guidance=value)
    for length in (0, 513):
        with pytest.raises(FieldError, match="max_sequence_length"):
            pipe.generate(GenerationRequest(prompts=["x"], height=64, width=48, steps=1, max_sequence_length=length))
    with pytest.raises(FieldError, match="multiple of 16"):
        pipe.generate(GenerationRequest(prompts=["x"], height=72, width=48, steps=1))
    ours(schnell.load(), steps=1, guidance=2.0)
    assert "no effect" in caplog.text


def test_wrong_files_are_one_line_errors(dev):
    tokenizers = (dev.clip_tokenizer, dev.t5_tokenizer)
    with pytest.raises(FieldError, match="^text_encoders takes .*: it holds a T5 text encoder, not a Flux transformer"):
        load(dev.files["t5"], tokenizer=tokenizers, device="cpu")
    with pytest.raises(UserError, match="text_encoders .* holds a Flux transformer; give it as the checkpoint"):
        load(dev.files["transformer"], vae=dev.files["vae"], text_encoders=(dev.files["transformer"],), device="cpu")
    with pytest.raises(FieldError, match="^text_encoders must give Flux.1's T5 text encoder, which .* does not hold"):
        load(dev.files["transformer"], vae=dev.files["vae"], text_encoders=(dev.files["clip"],), tokenizer=tokenizers, device="cpu")
    with pytest.raises(FieldError, match="^vae must give Flux.1's Flux VAE, which .* does not hold"):
        load(dev.files["transformer"], text_encoders=(dev.files["clip"], dev.files["t5"]), tokenizer=tokenizers, device="cpu")


def test_cli_txt2img(dev, tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "txt2img", "--ckpt", dev.files["transformer"], "--vae", dev.files["vae"], "--text-encoder", dev.files["clip"],
        "--text-encoder", dev.files["t5"], "--tokenizer", dev.clip_tokenizer, "--tokenizer", dev.t5_tokenizer,
        "--H", 64, "--W", 48, "--steps", 2, "--n_samples", 1, "--seed", 1, "--device", "cpu", "--precision", "full",
        "--max-sequence-length", T5_LENGTH, "--guidance", 4, "--outdir", tmp_path, "--skip_grid",
    )
    assert code == 0, err
    assert "Flux.1 dev, flow matching" in out
    image = next(tmp_path.rglob("*.png"))
    assert "Distilled CFG Scale: 4" in Image.open(image).info["parameters"]
    code, out, err = run_cli(capsys, "txt2img", "--ckpt", dev.files["transformer"], "--max-sequence-length", 0, "--device", "cpu")
    assert code == 1 and "--max-sequence-length" in err and len(err.strip().splitlines()) == 1


def test_inspect_names_the_variant_and_its_parts(dev, schnell):
    from optimized_sd.weights.inspect import describe_checkpoint, format_info

    text = format_info(describe_checkpoint(dev.files["transformer"], hashes=False))
    assert "Flux.1 dev" in text and "Flux transformer" in text and "float32" in text
    assert "missing" in text and "CLIP-L text encoder (--text-encoder)" in text and "Flux VAE (--vae)" in text
    assert "Flux.1 schnell" in format_info(describe_checkpoint(schnell.files["transformer"], hashes=False))


def test_stream_units_cover_every_weight_once(dev):
    from optimized_sd.pipelines.placement import stream_units

    pipe = dev.load()
    units = [path for unit in stream_units(pipe.model) for path in unit]
    owned = [name for path in units for name, _ in pipe.model.get_submodule(path).named_parameters(prefix=path)]
    every = [name for name, _ in pipe.model.model.diffusion_model.named_parameters(prefix="model.diffusion_model")]
    assert sorted(owned) == sorted(every)


def test_inpaint_latents_equal_diffusers(dev, monkeypatch):
    """A 4-channel blend as FluxInpaintPipeline: the unmasked latents put back noised to each next sigma (the mask
    binary, no blur; the reference's latent sampling pinned to the posterior mean, as ours)."""
    import diffusers.pipelines.flux.pipeline_flux_inpaint as inpaint_module

    original = inpaint_module.retrieve_latents

    def mean_latents(output, generator=None, sample_mode="sample"):
        return original(output, sample_mode="argmax")

    monkeypatch.setattr(inpaint_module, "retrieve_latents", mean_latents)
    size = 64
    image = Image.fromarray((torch.rand(size, size, 3, generator=torch.Generator().manual_seed(4)) * 255).byte().numpy())
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, 32, 48))
    pipe = dev.load()
    request = GenerationRequest(
        prompts=[PROMPT], seed=42, height=size, width=size, max_sequence_length=T5_LENGTH, steps=4, strength=0.7,
        init_image=image, inpaint=InpaintOptions(mask, mask_blur=0),
    )
    result = pipe.generate(request)
    pipeline = dev.diffusers_pipeline(diffusers.FluxInpaintPipeline)
    with torch.no_grad():
        packed = pipeline(
            prompt=PROMPT, image=image, mask_image=mask, height=size, width=size, num_inference_steps=4, strength=0.7,
            guidance_scale=3.5, max_sequence_length=T5_LENGTH, generator=torch.Generator("cpu").manual_seed(42), output_type="latent",
        ).images
    expected = unpack_latents(packed, size // 8, size // 8)
    assert torch.allclose(result.latents, expected, atol=1e-4), (result.latents - expected).abs().max()


def test_tokenizer_folders_told_apart(dev, tmp_path):
    from optimized_sd.pipelines.flux import tokenizer_kind

    assert (tokenizer_kind(dev.clip_tokenizer), tokenizer_kind(dev.t5_tokenizer)) == ("clip", "t5")
    with pytest.raises(UserError, match="are both CLIP tokenizers"):
        dev.load(tokenizer=(dev.clip_tokenizer, write_tokenizer(tmp_path / "other", False)))
    with pytest.raises(UserError, match="neither a CLIP tokenizer"):
        dev.load(tokenizer=(tmp_path,))

"""Flux.1 networks and loading against diffusers and transformers on tiny random models (fp32, CPU): the
transformer from a BFL-named file equals diffusers' FluxTransformer2DModel, the key map inverts diffusers'
own single-file converter exactly, the T5 tower equals transformers', the 16-channel VAE equals diffusers'."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from optimized_sd.errors import CheckpointError, UserError
from optimized_sd.models.flux import (
    Flux,
    FluxConfig,
    image_ids,
    latents_from_vae,
    latents_to_vae,
    pack_latents,
    text_ids,
    unpack_latents,
)
from optimized_sd.models.ops import default_init
from optimized_sd.pipelines.flux import pooled_output
from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX, flux_parts, identify_flux
from optimized_sd.weights.flux_loading import load_component, prepare_flux
from optimized_sd.weights.sources import DictSource

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,  # RoPE axes in Flux's proportions: (4, 14, 14)
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    axes_dims_rope=(4, 14, 14),
)


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init (norm scales of 1, zero biases), so a misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module.eval()


def tiny_diffusers_flux(guidance: bool, seed: int = 0):
    torch.manual_seed(seed)
    return perturbed(diffusers.FluxTransformer2DModel(**TINY, guidance_embeds=guidance), seed)


def bfl_tensors(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer state dict renamed to BFL's keys by our map (as a file would hold them)."""
    source = DictSource(state)
    view = flux_parts(source, identify_flux(source.shapes()))["transformer"]
    return {prefix + key: view.get(key).clone().contiguous() for key in view.keys()}


def flux_inputs(batch: int = 2, height: int = 8, width: int = 6, tokens: int = 5, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, height, width, generator=generator)
    return dict(
        img=pack_latents(latents),
        img_ids=image_ids(height, width),
        txt=torch.randn(batch, tokens, TINY["joint_attention_dim"], generator=generator),
        txt_ids=text_ids(tokens),
        timesteps=torch.tensor([0.9, 0.35])[:batch],
        y=torch.randn(batch, TINY["pooled_projection_dim"], generator=generator),
    )


def diffusers_output(model, inputs: dict, guidance: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=inputs["img"],
            encoder_hidden_states=inputs["txt"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
            img_ids=inputs["img_ids"],
            txt_ids=inputs["txt_ids"],
            guidance=guidance,
            return_dict=False,
        )[0]


def test_packing_and_ids_match_diffusers():
    pipeline = diffusers.FluxPipeline
    latents = torch.randn(2, 16, 10, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, pipeline._pack_latents(latents, 2, 16, 10, 6))
    assert torch.equal(unpack_latents(packed, 10, 6), pipeline._unpack_latents(packed, 80, 48, 8))
    assert torch.equal(unpack_latents(packed, 10, 6), latents)
    assert torch.equal(image_ids(10, 6), pipeline._prepare_latent_image_ids(2, 5, 3, "cpu", torch.float32))
    assert torch.allclose(latents_from_vae(latents_to_vae(latents)), latents, atol=1e-6)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_transformer_from_bfl_file_equals_diffusers(tmp_path, guidance):
    reference = tiny_diffusers_flux(guidance)
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl_tensors(reference.state_dict(), COMFY_TRANSFORMER_PREFIX if guidance else ""), str(path))
    component = prepare_flux([path])["transformer"]
    assert component.model.config.guidance_embed is guidance
    model = load_component(component)
    inputs = flux_inputs()
    guidance_values = torch.tensor([3.5, 2.0]) if guidance else None
    with torch.no_grad():
        ours = model(**inputs, guidance=guidance_values)
    expected = diffusers_output(reference, inputs, guidance_values)
    assert ours.shape == expected.shape == (2, 12, 16)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()


def test_diffusers_file_loads_through_the_map(tmp_path):
    """A diffusers-layout transformer file is renamed at load time (q, k, v concatenated, adaLN halves swapped)."""
    reference = tiny_diffusers_flux(True, seed=3)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = load_component(prepare_flux([path])["transformer"])
    inputs = flux_inputs(seed=4)
    guidance = torch.tensor([4.0, 1.5])
    with torch.no_grad():
        ours = model(**inputs, guidance=guidance)
    assert torch.allclose(ours, diffusers_output(reference, inputs, guidance), atol=1e-4, rtol=1e-4)


def test_bfl_keys_convert_back_exactly_with_diffusers_converter():
    """Our diffusers -> BFL map is the exact inverse of diffusers' single-file converter. That converter
    hard-codes Flux.1's 3072 width for the single blocks' split, so the tensors have Flux.1's row counts
    and one column (only the rows are split, concatenated or swapped)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    generator = torch.Generator().manual_seed(5)
    shapes = {k: tuple(v.shape) for k, v in tiny_diffusers_flux(True).state_dict().items()}
    width, mlp = 3072, 4 * 3072
    state = {}
    for key, shape in shapes.items():
        rows = shape[0]
        if key.startswith("single_transformer_blocks.") and ".attn.to_" in key:
            rows = width
        elif key.startswith("single_transformer_blocks.") and ".proj_mlp." in key:
            rows = mlp
        state[key] = torch.randn(rows, *([1] if len(shape) > 1 else []), generator=generator)
    bfl = bfl_tensors(state, COMFY_TRANSFORMER_PREFIX)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(back) == set(state)
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_hoisted_modulation_equals_forward():
    torch.manual_seed(6)
    config = FluxConfig(
        hidden_size=64, num_heads=2, depth=2, depth_single_blocks=3, mlp_hidden=256, in_channels=16, out_channels=16,
        context_in_dim=24, vec_in_dim=20,
    )
    model = perturbed(default_init(Flux(config)), 6)
    inputs = flux_inputs(seed=7)
    steps = [(torch.tensor([t, t]), torch.tensor([3.5, 3.5]), inputs["y"]) for t in (1.0, 0.6, 0.2)]
    hoisted = model.precompute_modulation(steps)
    assert len(hoisted) == 3
    with torch.no_grad():
        for (t, guidance, _), modulation in zip(steps, hoisted):
            full = model(**{**inputs, "timesteps": t}, guidance=guidance)
            given = model.forward_modulated(inputs["img"], inputs["img_ids"], inputs["txt"], inputs["txt_ids"], modulation)
            assert torch.allclose(full, given, atol=1e-5, rtol=1e-5)
    assert {name.split(".")[0] for name in model.block_names()} == {name for name, _ in model.named_children()}
    names = model.modulation_modules()
    assert len(names) == 2 * 2 + 3 + 1 and all(model.get_submodule(name) is not None for name in names)


def test_config_from_real_flux_shapes():
    """Flux.1 dev's own key set and shapes (from a meta build of the default config) read back as that config."""
    with torch.device("meta"):
        model = Flux(FluxConfig())
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert FluxConfig.from_shapes(shapes) == FluxConfig()
    assert FluxConfig().axes_dim == (16, 56, 56)
    assert shapes["single_blocks.37.linear1.weight"] == (3 * 3072 + 12288, 3072)
    assert len(shapes) == 780  # BFL's flux1-dev.safetensors holds 780 tensors
    without_guidance = {k: v for k, v in shapes.items() if not k.startswith("guidance_in.")}
    assert identify_flux(without_guidance).variant == "schnell"
    assert identify_flux({COMFY_TRANSFORMER_PREFIX + k: v for k, v in shapes.items()}).variant == "dev"


@pytest.mark.parametrize(
    ("key", "shape", "family"),
    [
        ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", (9, 3), "Stable Diffusion 3"),
        ("distilled_guidance_layer.in_proj.bias", (4,), "Chroma"),
        ("model.diffusion_model.double_stream_modulation_img.lin.weight", (4, 4), "Flux.2"),
        ("img_in.weight", (3072, 384), "Fill"),
        ("img_in.weight", (3072, 128), "Depth/Canny"),
    ],
)
def test_unsupported_relatives_are_named(key, shape, family):
    with pytest.raises(CheckpointError, match=family):
        identify_flux({key: shape, "double_blocks.0.img_attn.norm.key_norm.scale": (128,)})


def test_no_flux_part_is_refused():
    with pytest.raises(CheckpointError, match="no Flux.1 part"):
        identify_flux({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})


def tiny_t5(seed: int = 8):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=48, feed_forward_proj="gated-gelu", dropout_rate=0.0
    )
    return perturbed(T5EncoderModel(config), seed)


def tiny_clip(seed: int = 9):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                            max_position_embeddings=77, bos_token_id=62, eos_token_id=63, pad_token_id=63)
    return perturbed(CLIPTextModel(config), seed)


def tiny_vae(seed: int = 10):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        use_quant_conv=False, use_post_quant_conv=False, norm_num_groups=32,
    )
    return perturbed(vae, seed)


@pytest.mark.parametrize("layout", ["transformers", "embed_tokens_only", "no_encoder_level"])
def test_t5_tower_equals_transformers(tmp_path, layout):
    reference = tiny_t5()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    if layout == "embed_tokens_only":
        state.pop("shared.weight")
    else:
        state.pop("encoder.embed_tokens.weight")
    if layout == "no_encoder_level":
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
    path = tmp_path / "t5.safetensors"
    save_file(state, str(path))
    component = prepare_flux([path])["t5"]
    tower = load_component(component)
    assert tower.transformer.encoder.embed_tokens.weight is tower.transformer.shared.weight
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(tower(ids), reference(input_ids=ids).last_hidden_state, atol=1e-5)


def test_vae_files_equal_diffusers(tmp_path):
    """A diffusers AutoencoderKL file (16 channels, no quant convs) and the same weights in BFL's
    `ae.safetensors` LDM names both decode and encode as diffusers does."""
    reference = tiny_vae()
    diffusers_path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(diffusers_path))
    ours = load_component(prepare_flux([diffusers_path])["vae"])
    assert not ours.config.use_quant_conv and ours.config.z_channels == 16
    ae_path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(ae_path))
    from_ae = load_component(prepare_flux([ae_path])["vae"])
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(11))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(12)) * 2 - 1
    with torch.no_grad():
        expected_image = reference.decode(latent).sample
        expected_mean = reference.encode(image).latent_dist.mean
        for model in (ours, from_ae):
            assert torch.allclose(model.decode(latent), expected_image, atol=1e-4)
            assert torch.allclose(model.encode(image), expected_mean, atol=1e-4)


def test_comfy_all_in_one_holds_every_part(tmp_path):
    """ComfyUI's single file: transformer, CLIP-L, T5 and VAE under their prefixes, each checked and loaded."""
    clip, t5 = tiny_clip(), tiny_t5()
    state = bfl_tensors(tiny_diffusers_flux(False).state_dict(), COMFY_TRANSFORMER_PREFIX)
    state.update({"text_encoders.clip_l.transformer.text_model." + k.removeprefix("text_model."): v for k, v in clip.state_dict().items()})
    t5_state = {k: v.clone() for k, v in t5.state_dict().items()}
    state.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5_state.items() if k != "encoder.embed_tokens.weight"})
    vae = load_component(prepare_flux([_saved(tmp_path / "v.safetensors", tiny_vae().state_dict())])["vae"])
    state.update({"vae." + k: v for k, v in vae.state_dict().items()})
    path = _saved(tmp_path / "flux1-schnell-aio.safetensors", state)
    info = identify_flux({k: tuple(v.shape) for k, v in state.items()})
    assert (info.transformer, info.variant, set(info.parts)) == ("bfl", "schnell", {"transformer", "clip_l", "t5", "vae"})
    components = prepare_flux([path])
    assert set(components) == {"transformer", "clip_l", "t5", "vae"}
    encoder = load_component(components["clip_l"])
    ids = torch.tensor([[62, 5, 9, 63] + [63] * 73])
    with torch.no_grad():
        ours = pooled_output(encoder(ids), ids, encoder.eos_token_id)
        assert torch.allclose(ours, clip(input_ids=ids).pooler_output, atol=1e-5)
    with pytest.raises(CheckpointError, match="both hold a T5"):
        prepare_flux([path, _saved(tmp_path / "t5.safetensors", {k: v for k, v in t5_state.items() if k != "shared.weight"})])


def test_mis_shaped_transformer_is_refused(tmp_path):
    state = bfl_tensors(tiny_diffusers_flux(True).state_dict())
    state["double_blocks.1.img_mlp.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="mis-shaped: double_blocks.1.img_mlp.2.weight"):
        prepare_flux([_saved(tmp_path / "bad.safetensors", state)])


def _saved(path, tensors: dict[str, torch.Tensor]):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_t5_tokenizer_folder(tmp_path):
    from transformers import T5Tokenizer

    from optimized_sd.models.t5 import load_t5_tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -float(i)) for i, w in enumerate(["a", "cat", "dog", "on"])]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(tmp_path / "tok"))
    tokenizer = load_t5_tokenizer(tmp_path / "tok", max_length=6)
    ids = tokenizer(["a cat", "a dog on a cat"])
    assert ids.tolist() == [[3, 4, 1, 0, 0, 0], [3, 5, 6, 3, 4, 1]]
    assert tokenizer.truncated_text("a cat on a dog on a cat") == "on a cat"
    with pytest.raises(UserError, match="spiece.model or tokenizer.json"):
        load_t5_tokenizer(tmp_path, max_length=6)

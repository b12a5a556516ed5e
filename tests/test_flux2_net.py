"""Flux.2 (klein) networks and loading against diffusers on tiny random models (fp32, CPU): the transformer from a
BFL-named file equals diffusers' Flux2Transformer2DModel, our key map is the exact inverse of diffusers' own
single-file converter, the VAE with its batch-norm latent statistics equals AutoencoderKLFlux2 plus the pipeline's
normalisation and patchify, and the latent packing and ids equal Flux2KleinPipeline's helpers."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import save_file

from optimized_sd.errors import CheckpointError
from optimized_sd.models.flux import Flux, FluxConfig
from optimized_sd.models.flux2 import (
    Flux2,
    Flux2Config,
    image_ids,
    noise_shape,
    pack,
    patchify,
    text_ids,
    token_grid,
    unpack,
    unpatchify,
)
from optimized_sd.models.ops import default_init
from optimized_sd.weights.flux2_keys import (
    flux2_transformer_view,
    identify_flux2,
    klein_is_distilled,
    prepare_flux2_transformer,
    prepare_flux2_vae,
)
from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX, identify_flux
from optimized_sd.weights.flux_loading import load_component
from optimized_sd.weights.sources import DictSource

diffusers = pytest.importorskip("diffusers")
Pipeline = diffusers.Flux2KleinPipeline

TINY = dict(
    patch_size=1,
    in_channels=32,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=32,  # four RoPE axes of 8
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(8, 8, 8, 8),
)


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init (norm scales of 1), so a misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module.eval()


def tiny_diffusers_flux2(guidance: bool = False, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    return perturbed(diffusers.Flux2Transformer2DModel(**{**TINY, **sizes}, guidance_embeds=guidance), seed)


def bfl_tensors(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Flux.2 state dict renamed to BFL's keys by our map (as an original file holds them)."""
    view = flux2_transformer_view(DictSource(state))
    return {prefix + key: view.get(key).clone().contiguous() for key in view.keys()}


def saved(path, tensors: dict[str, torch.Tensor]):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def flux2_inputs(batch: int = 2, rows: int = 4, cols: int = 3, tokens: int = 5, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        img=pack(torch.randn(batch, TINY["in_channels"], rows, cols, generator=generator)),
        img_ids=image_ids(rows, cols),
        txt=torch.randn(batch, tokens, TINY["joint_attention_dim"], generator=generator),
        txt_ids=text_ids(tokens),
        timesteps=torch.tensor([0.9, 0.35])[:batch],
    )


def diffusers_output(model, inputs: dict, guidance: torch.Tensor | None = None) -> torch.Tensor:
    batch = inputs["img"].shape[0]
    with torch.no_grad():
        return model(
            hidden_states=inputs["img"],
            encoder_hidden_states=inputs["txt"],
            timestep=inputs["timesteps"],
            img_ids=inputs["img_ids"][None].expand(batch, -1, -1),
            txt_ids=inputs["txt_ids"][None].expand(batch, -1, -1),
            guidance=guidance,
            return_dict=False,
        )[0]


@pytest.mark.parametrize("prefix", ["", COMFY_TRANSFORMER_PREFIX], ids=["bfl", "comfy"])
def test_transformer_from_bfl_file_equals_diffusers(tmp_path, prefix):
    reference = tiny_diffusers_flux2()
    component = prepare_flux2_transformer(saved(tmp_path / "flux-2-klein-tiny.safetensors", bfl_tensors(reference.state_dict(), prefix)))
    assert component.model.config == Flux2Config(
        hidden_size=64, num_heads=2, depth=2, depth_single_blocks=3, mlp_hidden=192, in_channels=32, out_channels=32, context_in_dim=24
    )
    model = load_component(component)
    assert {name.split(".")[0] for name in model.block_names()} == {name for name, _ in model.named_children()}
    inputs = flux2_inputs()
    with torch.no_grad():
        ours = model(**inputs)
    expected = diffusers_output(reference, inputs)
    assert ours.shape == expected.shape == (2, 12, 32)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()


def test_diffusers_folder_loads_through_the_map(tmp_path):
    """A diffusers `transformer/` folder is renamed at load time and computes as diffusers does; the batched ids
    (B, L, 4) of the pipeline work too."""
    reference = tiny_diffusers_flux2(seed=3)
    folder = tmp_path / "transformer"
    folder.mkdir()
    saved(folder / "diffusion_pytorch_model.safetensors", reference.state_dict())
    model = load_component(prepare_flux2_transformer(folder))
    inputs = flux2_inputs(seed=4)
    with torch.no_grad():
        ours = model(**{**inputs, "img_ids": inputs["img_ids"][None].expand(2, -1, -1)})
    assert torch.allclose(ours, diffusers_output(reference, inputs), atol=1e-4, rtol=1e-4)


def test_guidance_embedder_maps_and_computes_as_diffusers(tmp_path):
    """Dev's guidance embedder (dev itself is refused, but the layer and its map are Flux.2's): through the view."""
    reference = tiny_diffusers_flux2(guidance=True, seed=13)
    with pytest.raises(CheckpointError, match=r"Flux.2 \[dev\]"):
        prepare_flux2_transformer(saved(tmp_path / "dev.safetensors", reference.state_dict()))
    source = flux2_transformer_view(DictSource(reference.state_dict()))
    model = Flux2(Flux2Config.from_shapes(source.shapes()))
    model.load_state_dict({key: source.get(key) for key in source.keys()})
    inputs = flux2_inputs(seed=14)
    guidance = torch.tensor([4.0, 1.5])
    with torch.no_grad():
        ours = model.eval()(**inputs, guidance=guidance)
    assert torch.allclose(ours, diffusers_output(reference, inputs, guidance), atol=1e-4, rtol=1e-4)


def test_bfl_keys_convert_back_exactly_with_diffusers_converter():
    """Our diffusers -> BFL map is the exact inverse of diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    for guidance in (False, True):
        state = {k: v.clone() for k, v in tiny_diffusers_flux2(guidance, seed=5).state_dict().items()}
        back = convert_flux2_transformer_checkpoint_to_diffusers(bfl_tensors(state))
        assert set(back) == set(state)
        assert all(torch.equal(back[key], state[key]) for key in state)


def test_hoisted_modulation_equals_forward():
    torch.manual_seed(6)
    model = perturbed(default_init(Flux2(Flux2Config(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=3, mlp_hidden=96,
                                                     in_channels=32, out_channels=32, context_in_dim=24))), 6)
    inputs = flux2_inputs(seed=7)
    steps = [(torch.tensor([t, t]), None) for t in (1.0, 0.6, 0.2)]
    hoisted = model.precompute_modulation(steps)
    assert len(hoisted) == 3
    with torch.no_grad():
        for (t, _), modulation in zip(steps, hoisted):
            full = model(**{**inputs, "timesteps": t})
            given = model.forward_modulated(inputs["img"], inputs["img_ids"], inputs["txt"], inputs["txt_ids"], modulation)
            assert torch.allclose(full, given, atol=1e-5, rtol=1e-5)
    names = model.modulation_modules()
    assert len(names) == 4 and all(model.get_submodule(name) is not None for name in names)


def real_shapes(config: Flux2Config, prefix: str = "") -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Flux2(config)
    return {prefix + key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_klein_sizes_and_dev_are_told_from_shapes():
    """Klein 4B's and 9B's key sets (meta builds) read back as their configs and sizes; dev is refused by name; Flux.1
    and Flux.2 detection never claim each other's files."""
    klein_4b = real_shapes(Flux2Config())
    assert Flux2Config.from_shapes(klein_4b) == Flux2Config() and Flux2Config().axes_dim == (32, 32, 32, 32)
    assert klein_4b["single_blocks.19.linear1.weight"] == (3 * 3072 + 2 * 9216, 3072)
    assert identify_flux2(klein_4b).size == "4B"
    nine = Flux2Config(hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, mlp_hidden=12288, context_in_dim=12288)
    found = identify_flux2(real_shapes(nine, COMFY_TRANSFORMER_PREFIX))
    assert (found.layout, found.prefix, found.size) == ("bfl", COMFY_TRANSFORMER_PREFIX, "9B")
    dev = Flux2Config(hidden_size=6144, num_heads=48, depth=1, depth_single_blocks=1, mlp_hidden=18432, context_in_dim=15360,
                      guidance_embed=True)
    with pytest.raises(CheckpointError, match=r"Flux.2 \[dev\]"):
        identify_flux2(real_shapes(dev))
    with pytest.raises(CheckpointError, match="Flux.2"):
        identify_flux(klein_4b)
    with torch.device("meta"):
        flux1 = {key: tuple(value.shape) for key, value in Flux(FluxConfig(depth=1, depth_single_blocks=1)).state_dict().items()}
    assert identify_flux(flux1).transformer == "bfl"
    with pytest.raises(CheckpointError, match="no Flux.2 transformer"):
        identify_flux2(flux1)


def test_distilled_or_base_from_flag_index_or_name(tmp_path):
    assert klein_is_distilled("flux-2-klein-4b.safetensors")
    assert not klein_is_distilled("models/flux-2-klein-base-9b-fp8.safetensors")
    assert klein_is_distilled("flux-2-klein-base-4b.safetensors", base=False)
    folder = tmp_path / "FLUX.2-klein-base-4B"
    (folder / "transformer").mkdir(parents=True)
    assert not klein_is_distilled(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    assert klein_is_distilled(folder / "transformer") and klein_is_distilled(folder)
    assert klein_is_distilled(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def test_foreign_and_mis_shaped_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="holds no Flux.2 transformer"):
        prepare_flux2_transformer(saved(tmp_path / "sd.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}))
    state = bfl_tensors(tiny_diffusers_flux2().state_dict())
    state["double_blocks.1.img_mlp.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="mis-shaped: double_blocks.1.img_mlp.2.weight") as caught:
        prepare_flux2_transformer(saved(tmp_path / "bad.safetensors", state))
    assert "\n" not in str(caught.value)
    with pytest.raises(CheckpointError, match="holds no Flux.2 VAE"):
        prepare_flux2_vae(saved(tmp_path / "ae1.safetensors", {"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}))


def test_packing_and_ids_match_the_pipeline():
    latents = torch.randn(2, 8, 10, 6)
    patched = patchify(latents)
    assert torch.equal(patched, Pipeline._patchify_latents(latents))
    assert torch.equal(unpatchify(patched), Pipeline._unpatchify_latents(patched)) and torch.equal(unpatchify(patched), latents)
    tokens = pack(patched)
    assert torch.equal(tokens, Pipeline._pack_latents(patched))
    ids = image_ids(5, 3)
    assert torch.equal(ids, Pipeline._prepare_latent_ids(patched)[0].float())
    assert torch.equal(unpack(tokens, 5, 3), Pipeline._unpack_latents_with_ids(tokens, ids[None].expand(2, -1, -1), 5, 3))
    assert torch.equal(text_ids(7), Pipeline._prepare_text_ids(torch.zeros(2, 7, 4))[0].float())
    assert torch.equal(image_ids(5, 3, time=10), Pipeline._prepare_image_ids([patched[:1]])[0].float())
    fake = types.SimpleNamespace(vae_scale_factor=8, _prepare_latent_ids=Pipeline._prepare_latent_ids, _pack_latents=Pipeline._pack_latents)
    expected, expected_ids = Pipeline.prepare_latents(fake, 2, 32, 200, 136, torch.float32, "cpu", torch.Generator().manual_seed(9))
    assert noise_shape(2, 200, 136) == (2, 128, 12, 8) and token_grid(200, 136) == (12, 8)
    assert torch.equal(pack(torch.randn(noise_shape(2, 200, 136), generator=torch.Generator().manual_seed(9))), expected)
    assert torch.equal(image_ids(12, 8), expected_ids[0].float())


def tiny_diffusers_vae(seed: int = 10):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(
        latent_channels=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    generator = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(torch.randn(32, generator=generator))
    vae.bn.running_var.copy_(torch.rand(32, generator=generator) + 0.5)
    return perturbed(vae, seed)


def test_vae_with_latent_statistics_equals_diffusers(tmp_path):
    """A diffusers AutoencoderKLFlux2 folder and the same weights in BFL's `ae` layout (quant convs inside encoder and
    decoder) both encode to and decode from the transformer's latents as the pipeline does."""
    reference = tiny_diffusers_vae()
    folder = tmp_path / "vae"
    folder.mkdir()
    saved(folder / "diffusion_pytorch_model.safetensors", reference.state_dict())
    ours = load_component(prepare_flux2_vae(folder))
    assert ours.config.use_quant_conv and ours.config.z_channels == 8 and ours.config.downscale == 4
    renamed = {("encoder." + k if k.startswith("quant_conv.") else "decoder." + k if k.startswith("post_quant_conv.") else k): v
               for k, v in ours.state_dict().items()}
    from_ae = load_component(prepare_flux2_vae(saved(tmp_path / "ae.safetensors", {**renamed, "bn.num_batches_tracked": torch.tensor(7)})))
    mean = reference.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(reference.bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
    latents = torch.randn(1, 32, 2, 3, generator=torch.Generator().manual_seed(11))
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(12)) * 2 - 1
    with torch.no_grad():
        expected_image = reference.decode(Pipeline._unpatchify_latents(latents * std + mean)).sample
        expected_latents = (Pipeline._patchify_latents(reference.encode(image).latent_dist.mode()) - mean) / std
        for model in (ours, from_ae):
            assert torch.allclose(model.decode(latents), expected_image, atol=1e-4)
            assert torch.allclose(model.encode(image), expected_latents, atol=1e-4)

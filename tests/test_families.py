"""SD 2.x and SDXL: family recognition of real layouts, config inference, and module parity with diffusers
(fp32, CPU) for every layout: text embeddings, pooled vector, UNet output with SDXL's size conditioning."""

from __future__ import annotations

import pytest
import torch

from optimized_sd.models.conditioner import size_conditioning
from optimized_sd.weights.loading import materialize, prepare_model

TOLERANCE = 1e-4
LAYOUTS = ("folder", "converted", "real")


def path_of(model, layout: str):
    return model.folder if layout == "folder" else model.files[layout]


def loaded_model(model, layout: str):
    loaded = prepare_model(path_of(model, layout))
    materialize(loaded.model, "", loaded.source, torch.device("cpu"), torch.float32)
    loaded.model.eval()
    return loaded


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def token_ids(batch: int, pad_id: int, seed: int = 3) -> torch.Tensor:
    """Prompts as a tokenizer gives them: start, words, end, then padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), pad_id)
    for row, length in enumerate((5, 12, 30)[:batch]):
        ids[row, 0] = 998
        ids[row, 1 : length + 1] = torch.randint(1, 990, (length,), generator=generator)
        ids[row, length + 1] = 999
    return ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sd2_config_and_report(tiny_sd2, layout):
    loaded = loaded_model(tiny_sd2, layout)
    config = loaded.config
    assert config.family == "sd2" and config.family_name == "SD 2.x"
    assert config.open_clip is not None and config.open_clip.layers == 2 and config.text is None
    assert config.unet.use_linear_in_transformer and config.unet.heads(128) == 2
    assert loaded.report.ok
    if layout == "real":  # the tower's last block and projection are carried, never run
        assert loaded.report.known_extras == {"unused last text layer": 13, "logit_scale": 1}
    else:
        assert "unused last text layer" not in loaded.report.known_extras


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.inference_mode()
def test_sd2_modules_match_diffusers(tiny_sd2, layout):
    model = loaded_model(tiny_sd2, layout).model
    ids = token_ids(3, pad_id=0)
    context, pooled = model.encode_text([ids])
    assert pooled is None
    assert max_diff(context, tiny_sd2.text_encoders[0](input_ids=ids).last_hidden_state) <= TOLERANCE

    torch.manual_seed(1)
    x, text = torch.randn(2, 4, 16, 24), torch.randn(2, 77, 64)
    t = torch.tensor([999.0, 37.0])
    expected = tiny_sd2.unet(x, t, encoder_hidden_states=text).sample
    assert expected.abs().max() > 0.1
    assert max_diff(model.model.diffusion_model(x, t, text), expected) <= TOLERANCE


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdxl_config_and_report(tiny_sdxl, layout):
    loaded = loaded_model(tiny_sdxl, layout)
    config = loaded.config
    assert config.family == "sdxl" and config.scale_factor == 0.13025
    assert config.unet.transformer_depth == (0, 1, 2) and config.unet.middle_depth() == 2
    assert config.unet.adm_in_channels == 64 + 6 * 256 and config.unet.context_dim == 96
    assert config.text is not None and config.text.penultimate
    assert config.open_clip is not None and config.open_clip.layers == 3 and config.open_clip.projection_dim == 64
    assert loaded.report.ok


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.inference_mode()
def test_sdxl_modules_match_diffusers(tiny_sdxl, layout):
    model = loaded_model(tiny_sdxl, layout).model
    clip_l, big_g = tiny_sdxl.text_encoders
    ids_l, ids_g = token_ids(3, pad_id=999), token_ids(3, pad_id=0)
    context, pooled = model.encode_text([ids_l, ids_g])
    out_l = clip_l(input_ids=ids_l, output_hidden_states=True)
    out_g = big_g(input_ids=ids_g, output_hidden_states=True)
    expected_context = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    assert max_diff(context, expected_context) <= TOLERANCE
    assert pooled is not None and max_diff(pooled, out_g.text_embeds) <= TOLERANCE

    torch.manual_seed(1)
    x, text, pooled_in = torch.randn(2, 4, 16, 24), torch.randn(2, 77, 96), torch.randn(2, 64)
    t = torch.tensor([999.0, 37.0])
    sizes = (128.0, 192.0, 0.0, 0.0, 128.0, 192.0)  # original (h, w), crop (top, left), target (h, w)
    time_ids = torch.tensor([sizes, sizes])
    expected = tiny_sdxl.unet(
        x, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled_in, "time_ids": time_ids}
    ).sample
    assert expected.abs().max() > 0.1
    got = model.model.diffusion_model(x, t, text, y=size_conditioning(pooled_in, sizes))
    assert max_diff(got, expected) <= TOLERANCE


def test_unet_refuses_missing_or_unexpected_y(tiny_sdxl, tiny_sd2):
    sdxl = loaded_model(tiny_sdxl, "real").model.model.diffusion_model
    with pytest.raises(ValueError, match="label_emb"):
        sdxl(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 96))


def diffusers_sdxl(model, scheduler=None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    return StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=model.text_encoders[0],
        text_encoder_2=model.text_encoders[1],
        tokenizer=CLIPTokenizer.from_pretrained(str(model.folder / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(model.folder / "tokenizer_2")),
        unet=model.unet,
        scheduler=scheduler or EulerDiscreteScheduler.from_pretrained(str(model.folder / "scheduler")),
        force_zeros_for_empty_prompt=True,
    )


def prompt_encoder(model, layout: str):
    from optimized_sd.pipelines.text import PromptEncoder, load_tower_tokenizers

    loaded = loaded_model(model, layout)
    folder = model.folder if layout == "folder" else None
    override = None if layout == "folder" else model.tokenizer  # a single file takes --tokenizer for every tower
    tokenizers = load_tower_tokenizers(loaded.config, folder, override)
    return PromptEncoder(loaded.model, tokenizers, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("layout", ["folder", "real"])
@torch.inference_mode()
def test_sdxl_prompt_conditioning_matches_diffusers(tiny_sdxl, layout):
    """Context, pooled vector and `y` for a prompt, and zeros for an empty negative prompt (SDXL base)."""
    encoder = prompt_encoder(tiny_sdxl, layout)
    pipe = diffusers_sdxl(tiny_sdxl)
    # diffusers zeroes the negative side when no negative prompt is given (None); ours when it is empty
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a red cube", device="cpu", negative_prompt=None)
    context, y = encoder.conditioning("a red cube", 64, 96)
    assert max_diff(context, embeds) <= TOLERANCE
    assert max_diff(y, size_conditioning(pooled, (64, 96, 0, 0, 64, 96))) <= TOLERANCE
    assert y.shape == (1, 64 + 6 * 256)
    uncond_context, uncond_y = encoder.conditioning("", 64, 96, negative=True)
    assert torch.count_nonzero(negative) == 0 and torch.count_nonzero(negative_pooled) == 0
    assert torch.count_nonzero(uncond_context) == 0 and torch.count_nonzero(uncond_y[:, :64]) == 0
    _, negative, _, negative_pooled = pipe.encode_prompt("a", device="cpu", negative_prompt="blurry")
    uncond_context, uncond_y = encoder.conditioning("blurry", 64, 96, negative=True)
    assert max_diff(uncond_context, negative) <= TOLERANCE and max_diff(uncond_y[:, :64], negative_pooled) <= TOLERANCE


@pytest.mark.parametrize("layout", ["folder", "converted"])
@torch.inference_mode()
def test_sd2_prompt_conditioning_matches_diffusers(tiny_sd2, layout):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    encoder = prompt_encoder(tiny_sd2, layout)
    pipe = StableDiffusionPipeline(
        vae=tiny_sd2.vae, text_encoder=tiny_sd2.text_encoders[0], tokenizer=CLIPTokenizer.from_pretrained(str(tiny_sd2.tokenizer)),
        unet=tiny_sd2.unet, scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    embeds, negative = pipe.encode_prompt("a red cube", "cpu", 1, True, negative_prompt="")
    context, y = encoder.conditioning("a red cube", 64, 64)
    assert y is None and max_diff(context, embeds) <= TOLERANCE
    assert max_diff(encoder.conditioning("", 64, 64, negative=True)[0], negative) <= TOLERANCE  # SD 2.x encodes ""


# -- prediction type ------------------------------------------------------------------------------
def test_prediction_auto_reads_what_the_file_states(tiny_sd2, tmp_path):
    from optimized_sd.weights.prediction import resolve_prediction

    assert resolve_prediction("auto", "sd2", tiny_sd2.folder, set(), None) == ("v_prediction", "scheduler_config.json")
    file = tiny_sd2.files["real"]
    assert resolve_prediction("auto", "sd2", file, {"v_pred"}, None) == ("v_prediction", "v_pred key")
    assert resolve_prediction("auto", "sd2", file, set(), {"modelspec.prediction_type": "v"})[0] == "v_prediction"
    assert resolve_prediction("auto", "sd2", file, set(), None) == ("epsilon", "family default")
    assert resolve_prediction("auto", "sd2", tmp_path / "v2-1_768-ema-pruned.safetensors", set(), None)[0] == "v_prediction"
    assert resolve_prediction("auto", "sdxl", tmp_path / "sdxl_768.safetensors", set(), None) == ("epsilon", "family default")
    assert resolve_prediction("eps", "sd2", tiny_sd2.folder, set(), None) == ("epsilon", "--prediction")


def test_prediction_v_on_an_eps_family_warns(caplog):
    from pathlib import Path

    from optimized_sd.errors import UserError
    from optimized_sd.weights.prediction import resolve_prediction

    assert resolve_prediction("v", "sd1", Path("x.ckpt"), set(), None)[0] == "v_prediction"
    assert "predict eps" in caplog.text
    with pytest.raises(UserError, match="choose one of auto, eps, v"):
        resolve_prediction("x", "sd1", Path("x.ckpt"), set(), None)


# -- --vae FILE -----------------------------------------------------------------------------------
def test_vae_file_replaces_the_checkpoints(tiny_sdxl, tiny_model, tmp_path):
    """An SD 1.x VAE on SDXL (same shapes: allowed), in LDM keys without prefix and as diffusers keys."""
    from safetensors.torch import save_file

    sd1 = prepare_model(tiny_model.safetensors).source
    ldm = {k[len("first_stage_model."):]: sd1.get(k).clone() for k in sd1.keys() if k.startswith("first_stage_model.")}
    save_file(ldm, str(tmp_path / "vae-ldm.safetensors"))
    save_file({k: v.contiguous() for k, v in tiny_model.vae.state_dict().items()}, str(tmp_path / "vae-diffusers.safetensors"))
    for name in ("vae-ldm.safetensors", "vae-diffusers.safetensors"):
        loaded = prepare_model(tiny_sdxl.files["real"], vae=tmp_path / name)
        key = "first_stage_model.decoder.conv_out.weight"
        assert torch.equal(loaded.source.get(key), sd1.get(key))
        unet_key = "model.diffusion_model.out.2.weight"
        assert torch.equal(loaded.source.get(unet_key), prepare_model(tiny_sdxl.files["real"]).source.get(unet_key))


def test_mis_shaped_vae_file_is_refused(tiny_sdxl, tmp_path):
    from safetensors.torch import save_file

    from optimized_sd.errors import CheckpointError

    source = prepare_model(tiny_sdxl.files["real"]).source
    vae = {k: source.get(k).clone() for k in source.keys() if k.startswith("first_stage_model.")}
    vae["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    save_file(vae, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not fit this model's VAE: 1 mis-shaped: first_stage_model.decoder.conv_out.weight"):
        prepare_model(tiny_sdxl.files["real"], vae=tmp_path / "bad.safetensors")


# -- streaming by parts ---------------------------------------------------------------------------
def test_full_size_stream_units_stay_under_100_mb():
    """On the meta device (no weights): SDXL's 10-layer blocks stream layer by layer, so no UNet unit of
    SD 1.x, SD 2.x or SDXL passes 100 MB in fp16, and each text tower streams by layer."""
    from optimized_sd.config import SD15, SD21_V, SDXL_BASE
    from optimized_sd.memory.modes import mode_row
    from optimized_sd.models.sd import LatentDiffusion
    from optimized_sd.pipelines.placement import (
        group_specs,
        parameter_bytes,
        stream_units,
    )

    for config in (SD15, SD21_V, SDXL_BASE):
        with torch.device("meta"):
            model = LatentDiffusion(config)
        assert max(parameter_bytes(model, unit, 2) for unit in stream_units(model)) <= 100e6
        text = [spec for spec in group_specs(mode_row("stream"), model) if spec.name.startswith("text.")]
        layers = [spec for spec in text if ".layers." in spec.name or ".resblocks." in spec.name]
        assert len(layers) == (config.text.num_hidden_layers if config.text else 0) + (config.open_clip.layers if config.open_clip else 0)
        assert max(parameter_bytes(model, spec.modules, 2) for spec in layers) <= 100e6
    units = stream_units(model)
    assert ("model.diffusion_model.input_blocks.7.1.transformer_blocks.9",) in units  # SDXL
    assert ("model.diffusion_model.input_blocks.7.1.norm", "model.diffusion_model.input_blocks.7.1.proj_in") in units


def test_stream_by_parts_gives_the_full_image(tiny_model, monkeypatch):
    """Every UNet block split to its parts and the text tower streamed by layer: the same latents as `full`."""
    import optimized_sd
    from optimized_sd.pipelines import placement
    from optimized_sd.pipelines.diffusion import GenerationRequest

    request = GenerationRequest(prompts=["a red cube"], steps=2, sampler="euler", seed=7, height=64, width=64)
    options = {"tokenizer": tiny_model.tokenizer, "device": "cpu", "precision": "full"}
    full = optimized_sd.load(tiny_model.safetensors, memory="full", **options).generate(request)
    monkeypatch.setattr(placement, "STREAM_UNIT_PARAMS", 1000)
    pipe = optimized_sd.load(tiny_model.safetensors, memory="stream", **options)
    streamed = pipe.generate(request)
    groups = pipe.engine.groups
    assert any(".transformer_blocks.0" in name for name in groups) and any(".encoder.layers.1" in name for name in groups)
    assert max_diff(streamed.latents, full.latents) <= 1e-5


def test_inspect_names_family_prediction_towers_and_size(tiny_sd2, tiny_sdxl):
    from optimized_sd.weights.inspect import describe_checkpoint, format_info

    folder = format_info(describe_checkpoint(tiny_sd2.folder))
    assert "sd2 (SD 2.x)" in folder and "v (scheduler_config.json)" in folder and "768x768 by default" in folder
    real = format_info(describe_checkpoint(tiny_sd2.files["real"], hashes=False))
    assert "SD 2.x" in real and "eps (family default)" in real and "OpenCLIP 2 layers run x 64" in real
    sdxl = format_info(describe_checkpoint(tiny_sdxl.files["converted"], hashes=False))
    assert "sdxl (SDXL)" in sdxl and "1024x1024 by default" in sdxl
    assert "CLIP ViT-L-style 2 layers x 32; OpenCLIP 3 layers run x 64, pooled 64" in sdxl


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_runs_sdxl_with_a_separate_vae_and_says_what_it_ran(capsys, tiny_sdxl, tmp_path):
    from safetensors.torch import save_file

    from optimized_sd.cli import main
    from optimized_sd.pipelines.output import read_parameters

    save_file({k: v.contiguous() for k, v in tiny_sdxl.vae.state_dict().items()}, str(tmp_path / "fix-vae.safetensors"))
    args = [
        "txt2img", "--ckpt", tiny_sdxl.files["real"], "--tokenizer", tiny_sdxl.tokenizer, "--outdir", tmp_path / "out",
        "--H", "64", "--W", "64", "--steps", "1", "--n_samples", "1", "--device", "cpu", "--seed", "5", "--sampler", "euler",
        "--vae", tmp_path / "fix-vae.safetensors", "--skip_grid",
    ]
    try:
        main([str(a) for a in args])
    except SystemExit as done:
        assert not done.code
    out = capsys.readouterr().out
    assert "SDXL, eps prediction (family default)" in out
    (image,) = sorted((tmp_path / "out").rglob("*.png"))
    assert "VAE hash: " in read_parameters(image) and "VAE: fix-vae.safetensors" in read_parameters(image)


def test_cli_refuses_a_mis_shaped_vae_in_one_line(capsys, tiny_sd2, tiny_model, tmp_path):
    from optimized_sd.cli import main

    args = ["txt2img", "--ckpt", tiny_sd2.files["real"], "--tokenizer", tiny_sd2.tokenizer, "--vae", tiny_model.safetensors,
            "--outdir", tmp_path / "out", "--device", "cpu"]
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --vae ") and "does not fit this model's VAE" in err and err.count("\n") == 1
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # nothing written

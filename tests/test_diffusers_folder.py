"""A diffusers folder's config.json files are the truth for that folder: head counts, the VAE scale and
the schedule come from them (shapes cannot show heads), and a missing or bad config is a one-line error."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from optimized_sd.config import TINY
from optimized_sd.errors import CheckpointError
from optimized_sd.models.text_encoder import clip_config
from optimized_sd.weights.diffusers_folder import DiffusersPart, unet_config
from optimized_sd.weights.infer import infer_config
from optimized_sd.weights.loading import materialize, open_checkpoint, prepare_model

TOLERANCE = 1e-4


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def four_heads(tiny_model, diffusers_variant):
    """A folder whose text encoder has 4 heads at width 64 (shapes say 1) and whose UNet has 4 heads (not 8)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(5)
    unet = UNet2DConditionModel(**{**tiny_model.unet.config, "attention_head_dim": 4})
    text = CLIPTextModel(clip_config(replace(TINY.text, num_attention_heads=4)))
    return diffusers_variant("four-heads", unet=unet, text_encoder=text), unet, text


@torch.inference_mode()
def test_head_counts_come_from_the_folder_configs(four_heads):
    folder, unet, text = four_heads
    loaded = prepare_model(folder)
    assert loaded.config.text.num_attention_heads == 4 and loaded.config.unet.num_heads == 4
    assert infer_config(loaded.checkpoint.source.shapes()).text.num_attention_heads == 1  # what shapes alone would say
    materialize(loaded.model, "", loaded.source, torch.device("cpu"), torch.float32)
    model = loaded.model.eval()

    ids = torch.randint(0, 998, (2, 77))
    expected = text(input_ids=ids).last_hidden_state
    assert (model.cond_stage_model(ids) - expected).abs().max() <= TOLERANCE

    torch.manual_seed(1)
    x, context, t = torch.randn(2, 4, 16, 24), torch.randn(2, 77, 64), torch.tensor([999.0, 37.0])
    expected = unet(x, t, encoder_hidden_states=context).sample
    assert expected.abs().max() > 0.1
    assert (model.model.diffusion_model(x, t, context) - expected).abs().max() <= TOLERANCE


def test_vae_scale_and_schedule_come_from_the_folder(diffusers_variant):
    folder = diffusers_variant("scheduled")
    edit_json(folder / "vae" / "config.json", scaling_factor=0.13025)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", "beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "scaled_linear",
                    "num_train_timesteps": 500, "prediction_type": "v_prediction"})
    )
    config = prepare_model(folder).config
    assert (config.scale_factor, config.linear_start, config.linear_end) == (0.13025, 0.001, 0.02)
    assert (config.timesteps, config.prediction_type) == (500, "v_prediction")


def test_a_folder_without_a_scheduler_keeps_the_sd1_schedule(tiny_model):
    config = prepare_model(tiny_model.folder).config
    assert config == replace(TINY, prediction_type="epsilon")


@pytest.mark.parametrize(
    ("part", "damage", "needle"),
    [
        ("text_encoder/config.json", None, r"text_encoder/config\.json is missing"),
        ("unet/config.json", "{not json", r"unet/config\.json: unreadable JSON"),
        ("vae/config.json", "[1, 2]", r"vae/config\.json: expected a JSON object"),
        ("unet/config.json", {"block_out_channels": "wide"}, r"unet/config\.json: block_out_channels is 'wide'"),
        (
            "unet/config.json",
            {"transformer_layers_per_block": [1, 2]},
            r"unet/config\.json: transformer_layers_per_block \[1, 2\] differs per level",
        ),
        ("unet/config.json", {"up_block_types": ["UpBlock2D", "UpBlock2D"]}, r"unet/config\.json: up_block_types .* do not mirror"),
        ("vae/config.json", {"latent_channels": True}, r"vae/config\.json: latent_channels is True"),
        ("text_encoder/config.json", {"layer_norm_eps": 1e-6}, r"text_encoder/config\.json: layer_norm_eps is 1e-06"),
        ("scheduler/scheduler_config.json", {"beta_schedule": "linear"}, r"scheduler_config\.json: beta_schedule 'linear'"),
        ("model_index.json", "", r"model_index\.json: unreadable JSON"),
    ],
)
def test_a_missing_or_bad_config_is_one_line_naming_the_file(diffusers_variant, part: str, damage, needle: str):
    folder = diffusers_variant("damaged")
    path = folder / part
    path.parent.mkdir(exist_ok=True)
    if damage is None:
        path.unlink()
    elif isinstance(damage, dict):
        edit_json(path, **damage) if path.exists() else path.write_text(json.dumps(damage))
    else:
        path.write_text(damage)
    with pytest.raises(CheckpointError, match=needle) as caught:
        prepare_model(folder)
    assert "\n" not in str(caught.value)


def test_unet_head_count_prefers_num_attention_heads(tmp_path):
    """diffusers' SD 1.x configs keep the head count in attention_head_dim; num_attention_heads, when set, wins."""
    base = {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "cross_attention_dim": 64}
    part = DiffusersPart("unet", tmp_path / "w", {**base, "attention_head_dim": 2}, tmp_path / "config.json")
    assert unet_config(part).num_heads == 2 and unet_config(part).attention_resolutions == (1,)
    part = replace(part, config={**base, "attention_head_dim": 2, "num_attention_heads": 4})
    assert unet_config(part).num_heads == 4
    part = replace(part, config={**base, "attention_head_dim": [4, 4]})
    assert unet_config(part).num_heads == 4


def test_unmapped_diffusers_keys_are_reported_not_dropped(tiny_model, diffusers_variant):
    from safetensors.torch import load_file, save_file

    folder = diffusers_variant("extra-key")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(str(weights)), "stray.weight": torch.ones(2)}, str(weights))
    assert "vae/stray.weight" in open_checkpoint(folder).source.keys()
    with pytest.raises(CheckpointError, match=r"1 unexpected: vae/stray\.weight"):
        prepare_model(folder)

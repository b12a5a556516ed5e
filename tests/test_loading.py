"""Strict loading details: EMA selection, known extras, key forms, refused layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from optimized_sd.errors import CheckpointError
from optimized_sd.weights.loading import UNET_PREFIX, prepare_model


@pytest.fixture(scope="module")
def tensors(tiny_model) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model.safetensors))


def ema_name(key: str) -> str:
    return "model_ema.diffusion_model" + key[len(UNET_PREFIX) :].replace(".", "")


def test_ema_weights_are_used_only_when_asked(tensors, tmp_path):
    ema = {ema_name(k): v + 1.0 for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    buffers = {"betas": torch.linspace(0, 1, 1000), "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)}
    path = tmp_path / "with-ema.ckpt"
    torch.save({"state_dict": {**tensors, **ema, **buffers}, "epoch": 3}, path)
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    regular = prepare_model(path)
    assert torch.equal(regular.source.get(key), tensors[key])
    assert regular.report.known_extras == {"EMA": len(ema) + 2, "schedule buffer": 1}
    chosen = prepare_model(path, ema=True)
    assert torch.equal(chosen.source.get(key), tensors[key] + 1.0)


def test_ema_requested_without_ema_weights(tiny_model):
    with pytest.raises(CheckpointError, match="ema finds no EMA weights in this checkpoint"):
        prepare_model(tiny_model.safetensors, ema=True)


def test_text_keys_load_with_or_without_text_model(tensors, tmp_path):
    prefix = "cond_stage_model.transformer."
    flipped = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            rest = rest[len("text_model.") :] if rest.startswith("text_model.") else "text_model." + rest
            key = prefix + rest
        flipped[key] = value
    path = tmp_path / "flipped.ckpt"
    torch.save(flipped, path)  # a bare state dict, as community files are
    assert prepare_model(path).report.ok


def test_a_missing_tensor_is_reported_by_name(tensors, tmp_path):
    path = tmp_path / "missing.ckpt"
    dropped = UNET_PREFIX + "input_blocks.1.0.in_layers.2.bias"
    torch.save({k: v for k, v in tensors.items() if k != dropped}, path)
    with pytest.raises(CheckpointError, match=r"1 missing: model\.diffusion_model\.input_blocks\.1\.0\.in_layers\.2\.bias"):
        prepare_model(path)


def test_diffusers_folder_without_a_part(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "partial"
    shutil.copytree(tiny_model.folder, copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(CheckpointError, match="has no vae/ subfolder"):
        prepare_model(copy)

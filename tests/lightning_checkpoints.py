"""Checkpoints for the loader tests: a tiny state dict under real SD 1.x key names, and CompVis-style
Lightning files written with a stand-in `pytorch_lightning` that is importable only while a file is
written, so loader tests prove nothing imports the real one."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

STANDIN = Path(__file__).parent / "lightning_standin"
UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model."


def tiny_sd1(ema_copy: bool = True) -> dict[str, torch.Tensor]:
    """Small tensors under real SD 1.x key names: 5 UNet, 2 VAE, 2 text-encoder weights plus extras."""
    g = torch.Generator().manual_seed(1)
    sd = {
        UNET + "input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),  # 288
        UNET + "input_blocks.0.0.bias": torch.randn(8, generator=g),  # 8
        UNET + "input_blocks.1.1.proj_in.weight": torch.randn(8, 8, 1, 1, generator=g),  # 64
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(8, 16, generator=g),  # 128
        UNET + "out.2.weight": torch.randn(4, 8, 3, 3, generator=g),  # 288
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),  # 216
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=g),  # 216
        TEXT + "embeddings.token_embedding.weight": torch.randn(10, 16, generator=g),  # 160
        TEXT + "final_layer_norm.weight": torch.randn(16, generator=g),  # 16
        TEXT + "embeddings.position_ids": torch.arange(7).unsqueeze(0),
        "betas": torch.linspace(1e-4, 2e-2, 10),
        "alphas_cumprod": torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 10), 0),
        "posterior_variance": torch.zeros(10),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32),
    }
    if ema_copy:
        sd["model_ema.diffusion_modelinput_blocks00weight"] = sd[UNET + "input_blocks.0.0.weight"].clone()
        sd["model_ema.diffusion_modelout2weight"] = sd[UNET + "out.2.weight"].clone()
    return sd


@contextlib.contextmanager
def lightning_standin() -> Iterator[type]:
    """Make `pytorch_lightning.callbacks.model_checkpoint` importable (a stand-in) only inside the block."""
    sys.path.insert(0, str(STANDIN))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module("pytorch_lightning.callbacks.model_checkpoint")
        yield module.ModelCheckpoint
    finally:
        sys.path.remove(str(STANDIN))
        for name in [m for m in sys.modules if m == "pytorch_lightning" or m.startswith("pytorch_lightning.")]:
            del sys.modules[name]


def write_lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """A CompVis-style Lightning checkpoint: callbacks keyed by the ModelCheckpoint class, numpy scalars."""
    with lightning_standin() as ModelCheckpoint:
        obj = {
            "epoch": 6,
            "global_step": np.int64(470000),
            "pytorch-lightning_version": "1.4.2",
            "state_dict": state_dict,
            "callbacks": {
                ModelCheckpoint: {
                    "monitor": None,
                    "best_model_score": None,
                    "best_model_path": "/logs/last.ckpt",
                    "current_score": np.float64(0.125),
                    "dirpath": "/logs/checkpoints",
                }
            },
            "callback_objects": [ModelCheckpoint(dirpath="/logs", monitor="val/loss", top_k=np.int32(3))],
        }
        torch.save(obj, path)
    assert "pytorch_lightning" not in sys.modules

"""Writing CompVis-style Lightning checkpoints in tests, with a stand-in `pytorch_lightning` that is
importable only while a file is written, so loader tests prove nothing imports the real one."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

STANDIN = Path(__file__).parent / "lightning_standin"


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

"""Test stand-in for Lightning's ModelCheckpoint, so a pickle names
`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` exactly as sd-v1-4.ckpt does."""

from __future__ import annotations

from typing import Any


class ModelCheckpoint:
    """Holds a few of the real callback's attributes; pickles as a plain object (NEWOBJ + BUILD)."""

    def __init__(self, dirpath: str | None = None, monitor: str | None = None, **extra: Any) -> None:
        self.dirpath = dirpath
        self.monitor = monitor
        self.best_model_path = ""
        self.best_model_score = None
        self.extra = dict(extra)

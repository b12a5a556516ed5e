"""What a checkpoint's UNet predicts (eps or v), from what the file says or, failing that, the family's default.

`--prediction auto` looks, in order, at: a diffusers folder's `scheduler/scheduler_config.json`
`prediction_type`; a `v_pred` marker key (ComfyUI and others write one into v-prediction files); the
safetensors metadata (`modelspec.prediction_type`, `prediction_type`); and else the family record's default
(`FamilyRecord.default_prediction`): eps, except SD 2.x files named with "768" (SD 2.x's 768 checkpoints are its
v-prediction ones; a documented heuristic, overridden by `--prediction`). The reason is returned for the run's
summary line."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from optimized_sd.errors import FieldError
from optimized_sd.families import registry

log = logging.getLogger("optimized_sd")

EPSILON, V_PREDICTION = "epsilon", "v_prediction"
CHOICES = ("auto", "eps", "v")
_FLAG_VALUES = {"eps": EPSILON, "v": V_PREDICTION}
_METADATA_VALUES = {"v": V_PREDICTION, "v_prediction": V_PREDICTION, "v-prediction": V_PREDICTION,
                    "epsilon": EPSILON, "eps": EPSILON}  # fmt: skip
_METADATA_KEYS = ("modelspec.prediction_type", "prediction_type")
V_FAMILIES: Mapping[str, bool] = registry.FamilyView(lambda record: True, include=lambda record: record.v_capable)
"""Families with v-prediction checkpoints (SD 2.x 768-v; SDXL v-pred fine-tunes): their records' `v_capable`."""


def stated_prediction(path: Path, keys: set[str], metadata: Mapping[str, str] | None) -> tuple[str, str] | None:
    """(prediction_type, where it was found) when the checkpoint states it, else None."""
    scheduler = path / "scheduler" / "scheduler_config.json"
    if path.is_dir() and scheduler.is_file():
        try:
            value = json.loads(scheduler.read_text()).get("prediction_type")
        except (OSError, ValueError):
            value = None
        if value in (EPSILON, V_PREDICTION):
            return value, "scheduler_config.json"
    if "v_pred" in keys:
        return V_PREDICTION, "v_pred key"
    for key in _METADATA_KEYS:
        value = (metadata or {}).get(key)
        if isinstance(value, str) and value.lower() in _METADATA_VALUES:
            return _METADATA_VALUES[value.lower()], f"{key} metadata"
    return None


def family_default(family: str, path: Path) -> tuple[str, str]:
    """The family's default when the file says nothing (see the module docstring)."""
    record = registry.find(family)
    return record.default_prediction(path) if record is not None else (EPSILON, "family default")


def resolve_prediction(
    requested: str, family: str, path: Path, keys: set[str], metadata: Mapping[str, str] | None
) -> tuple[str, str]:
    """(prediction_type, why) for `--prediction requested` ("auto", "eps" or "v")."""
    if requested not in CHOICES:
        raise FieldError.about("prediction", f"{requested!r}: choose one of {', '.join(CHOICES)}")
    if requested != "auto":
        record = registry.find(family)
        if requested == "v" and not (record is not None and record.v_capable):
            log.warning("prediction v: %s models predict eps; the images will likely be noise", family)
        return _FLAG_VALUES[requested], "--prediction"
    return stated_prediction(path, keys, metadata) or family_default(family, path)

"""Model families as records in one registry (see `registry`); the built-in SD records are in `sd`."""

from optimized_sd.families.registry import (
    Defaults,
    DiffusersLayout,
    FamilyRecord,
    LatentFormat,
    Loader,
    LoraKeys,
    TextTower,
    Units,
    by_name,
    claiming,
    detect,
    find,
    record_for,
    records,
    register,
    unregister,
)

__all__ = [
    "Defaults",
    "DiffusersLayout",
    "FamilyRecord",
    "LatentFormat",
    "LoraKeys",
    "Loader",
    "TextTower",
    "Units",
    "by_name",
    "claiming",
    "detect",
    "find",
    "record_for",
    "records",
    "register",
    "unregister",
]

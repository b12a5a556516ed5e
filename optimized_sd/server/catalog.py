"""The models a server may switch between: files under `--models-dir` (or the one `--ckpt`).

A request names a model; it never gives a path. Names are matched against this list only, so no
path from a request is ever opened."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from optimized_sd.errors import UserError

MODEL_SUFFIXES = (".safetensors", ".ckpt")
CONTROLNET_FOLDER = "ControlNet"  # AUTOMATIC1111's models/ControlNet: the ControlNets a request may name
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt")
NOT_MODEL_FOLDERS = ("VAE-approx", "vae_approx", CONTROLNET_FOLDER)  # preview decoders (server.preview), ControlNets
HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")  # AUTOMATIC1111's titles end in " [shorthash]"


@dataclass(frozen=True)
class ModelEntry:
    """One model as AUTOMATIC1111 lists it: `title` (file name relative to the folder), `model_name`
    (the title without its extension) and `path`, for the server's eyes."""

    title: str
    model_name: str
    path: Path


def entry_for(path: Path, root: Path) -> ModelEntry:
    relative = path.relative_to(root).as_posix()
    stem = relative[: -len(path.suffix)] if path.suffix in MODEL_SUFFIXES else relative
    return ModelEntry(relative, stem, path)


class ModelCatalog:
    """Listing and lookup; the listing is read again on each call so new files appear."""

    def __init__(self, models_dir: Path | None = None, ckpt: Path | None = None) -> None:
        if models_dir is None and ckpt is None:
            raise UserError("give --ckpt FILE or --models-dir DIR")
        if models_dir is not None and not models_dir.is_dir():
            raise UserError(f"--models-dir {models_dir} is not a folder")
        if ckpt is not None and not ckpt.exists():
            raise UserError(f"checkpoint not found: {ckpt}")
        self.models_dir = models_dir.resolve() if models_dir is not None else None
        self.ckpt = ckpt

    def entries(self) -> list[ModelEntry]:
        found: list[ModelEntry] = []
        if self.models_dir is not None:
            for folder, subfolders, files in os.walk(self.models_dir):
                here = Path(folder)
                if (here / "model_index.json").is_file() and here != self.models_dir:
                    found.append(entry_for(here, self.models_dir))  # a diffusers folder: one model
                    subfolders.clear()
                    continue
                subfolders[:] = sorted(name for name in subfolders if name not in NOT_MODEL_FOLDERS)
                found.extend(entry_for(here / name, self.models_dir) for name in sorted(files) if name.endswith(MODEL_SUFFIXES))
            found.sort(key=lambda entry: entry.title)
        if self.ckpt is not None and not any(e.path.resolve() == self.ckpt.resolve() for e in found):
            found.insert(0, entry_for(self.ckpt, self.ckpt.parent))
        return found

    def find(self, name: str) -> ModelEntry | None:
        """The entry whose title or model name is `name` (an AUTOMATIC1111 " [hash]" suffix ignored)."""
        wanted = HASH_SUFFIX.sub("", name.strip())
        for entry in self.entries():
            if wanted in (entry.title, entry.model_name):
                return entry
        return None

    def controlnet_folders(self) -> list[Path]:
        """`ControlNet/` in the models folder and beside it (AUTOMATIC1111's models/ControlNet), or beside a --ckpt."""
        roots = [self.models_dir, self.models_dir.parent] if self.models_dir is not None else []
        if self.ckpt is not None:
            roots.append(self.ckpt.parent)
        return [root / CONTROLNET_FOLDER for root in roots]

    def controlnets(self) -> list[ModelEntry]:
        """The ControlNets a request may name (files, and diffusers folders holding a config.json), one per name."""
        found: dict[str, ModelEntry] = {}
        for folder in self.controlnet_folders():
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                is_file = path.is_file()
                if path.suffix in CONTROLNET_SUFFIXES if is_file else (path / "config.json").is_file():
                    name = path.stem if is_file else path.name
                    found.setdefault(name, ModelEntry(path.name, name, path))
        return list(found.values())

    def find_controlnet(self, name: str) -> ModelEntry | None:
        """The ControlNet called `name` (its file name, or its stem with or without sd-webui-controlnet's " [hash]")."""
        wanted = HASH_SUFFIX.sub("", name.strip())
        return next((entry for entry in self.controlnets() if wanted in (entry.title, entry.model_name)), None)

    def default(self) -> ModelEntry:
        """The model loaded at start: --ckpt when given, else the first under --models-dir."""
        if self.ckpt is not None:
            return next(e for e in self.entries() if e.path.resolve() == self.ckpt.resolve())
        return self.first()

    def first(self) -> ModelEntry:
        entries = self.entries()
        if not entries:
            raise UserError(f"no model (.safetensors, .ckpt or diffusers folder) under {self.models_dir}")
        return entries[0]

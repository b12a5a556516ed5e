"""Textual-inversion embeddings in AUTOMATIC1111's formats, found by file name in a folder.

Formats (as AUTOMATIC1111 reads them): a `.pt` with `string_to_param: {'*': (n, C)}` (a dict, or
the original textual-inversion files' pickled `torch.nn.ParameterDict`, read inertly), a
`.safetensors` with `emb_params` (or any file holding a single tensor, as diffusers' concept files),
and SDXL's `clip_l` / `clip_g` pairs (one set of vectors per text tower). The name written in a
prompt is the file stem; each of the n vectors takes one token position.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from optimized_sd.errors import UserError

from .ckpt import load_ckpt
from .lora import check_finite, read_tensors
from .sources import SafetensorsSource

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
TOWER_KEYS = ("clip_l", "clip_g")  # SDXL pairs: the first and second text tower's vectors
WIDTH_FAMILY = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file: a (n, C) float32 tensor per text tower (one tower except SDXL pairs)."""

    name: str
    path: Path
    vectors: tuple[Tensor, ...]

    def for_towers(self, widths: Sequence[int]) -> tuple[Tensor, ...]:
        """The vectors for a model whose text towers take tokens of `widths`; UserError when they do not fit."""
        got = tuple(int(v.shape[-1]) for v in self.vectors)
        if got != tuple(widths):
            if len(got) == 2:
                kind = "SDXL (clip_l + clip_g vectors)"
            else:
                kind = f"{WIDTH_FAMILY.get(got[0], 'another model')} ({got[0]}-wide vectors)"
            raise UserError(
                f"embedding {self.name} ({self.path.name}) is for {kind}; this model's text encoder"
                f"{'s take' if len(widths) > 1 else ' takes'} {' + '.join(map(str, widths))}-wide tokens"
            )
        return self.vectors


def _as_vectors(value: object, path: Path, what: str) -> Tensor:
    """(n, C) float32 vectors; the shape is checked before anything is copied."""
    if not isinstance(value, Tensor) or value.dim() not in (1, 2) or not value.is_floating_point():
        raise UserError(f"{path.name}: {what} is not a (vectors, width) float tensor")
    check_finite(path, what, value)
    vectors = value[None] if value.dim() == 1 else value  # a diffusers concept is one (width,) vector
    if not 1 <= vectors.shape[0] <= 75:
        raise UserError(f"{path.name}: an embedding must have 1 to 75 vectors, this one has {vectors.shape[0]}")
    return vectors.detach().float()


def read_embedding(path: Path) -> Embedding:
    """Read one embedding file (never through a plain torch.load)."""
    path = Path(path)
    data: dict
    if path.suffix == ".safetensors":
        data = read_tensors(path)
    else:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        data = load_ckpt(path)  # keeps nested dicts such as string_to_param
    if "string_to_param" in data:
        params = data["string_to_param"]  # a dict, or a pickled ParameterDict read as one (ckpt.InertParameterDict)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise UserError(f"{path.name}: string_to_param must hold exactly one entry")
        vectors: tuple[Tensor, ...] = (_as_vectors(next(iter(params.values())), path, "string_to_param"),)
    elif all(key in data for key in TOWER_KEYS):
        vectors = tuple(_as_vectors(data[key], path, key) for key in TOWER_KEYS)
        if vectors[0].shape[0] != vectors[1].shape[0]:
            raise UserError(f"{path.name}: clip_l and clip_g hold different numbers of vectors")
    elif "emb_params" in data:
        vectors = (_as_vectors(data["emb_params"], path, "emb_params"),)
    else:
        tensors = [value for value in data.values() if isinstance(value, Tensor)]
        if len(tensors) != 1:
            raise UserError(f"{path.name}: not an embedding (no string_to_param, emb_params or clip_l/clip_g)")
        vectors = (_as_vectors(tensors[0], path, "its tensor"),)
    return Embedding(name=path.stem, path=path, vectors=vectors)


class EmbeddingLibrary(Mapping[str, Embedding]):
    """The embeddings of a folder (recursively), by file stem; each file is read when first used, so a
    large folder costs a directory listing, not a load of every file."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.paths: dict[str, Path] = {}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.rglob("*")):
                if path.suffix in EMBEDDING_SUFFIXES and path.is_file() and not _is_lora(path):
                    self.paths.setdefault(path.stem, path)
        self._loaded: dict[str, Embedding] = {}

    def __getitem__(self, name: str) -> Embedding:
        if name not in self._loaded:
            self._loaded[name] = read_embedding(self.paths[name])
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def _is_lora(path: Path) -> bool:
    """A LoRA dropped into the embeddings folder is not an embedding (checked from the header only)."""
    if path.suffix != ".safetensors":
        return False
    try:
        keys = SafetensorsSource(path).keys()
    except UserError:
        return False
    return any(".lora_" in key or "lora_A" in key for key in keys)


class TowerEmbeddings(Mapping[str, Tensor]):
    """One text tower's view of a library: name -> (n, C) vectors for tower `index` of a model with
    token widths `widths` (what `prompts.encoding.PromptEncoder` takes)."""

    def __init__(self, library: Mapping[str, Embedding], widths: Sequence[int], index: int = 0) -> None:
        self.library, self.widths, self.index = library, tuple(widths), index

    def __getitem__(self, name: str) -> Tensor:
        return self.library[name].for_towers(self.widths)[self.index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.library)

    def __len__(self) -> int:
        return len(self.library)

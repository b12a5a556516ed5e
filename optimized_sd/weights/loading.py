"""Open any supported checkpoint as an LDM-named tensor source, check it strictly against the
model, and copy its tensors into modules (all at once, or group by group for the memory engine)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from optimized_sd.config import FAMILY_NAMES, ModelConfig
from optimized_sd.errors import CheckpointError, CheckpointFieldError
from optimized_sd.tensor_swap import set_tensor
from optimized_sd.weights.ckpt import load_ckpt, looks_like_safetensors, state_dict_from_ckpt
from optimized_sd.weights.diffusers_folder import (
    DiffusersFolder,
    find_weight_file,  # noqa: F401  (the folder's weight-file rule, for callers that know only the loader)
    folder_model_config,
    part_source,
    read_diffusers_folder,
)
from optimized_sd.weights.family import UNET_PREFIX, canonical_key, detect_family, ema_key, known_extra_key
from optimized_sd.weights.gguf import gguf_model_source, is_gguf_file
from optimized_sd.weights.infer import infer_config, unused_keys
from optimized_sd.weights.sources import (
    ChainSource,
    ComputedSource,
    DictSource,
    RenamedSource,
    SafetensorsSource,
    TensorSource,
    open_regular_file,
)


@dataclass
class Checkpoint:
    """An opened checkpoint: LDM-named tensors (CLIP keys in `family.canonical_key` form) plus what
    is known about the file; `folder` is set for diffusers folders (their configs are the truth)."""

    source: TensorSource
    path: Path
    tokenizer_dir: Path | None = None
    folder: DiffusersFolder | None = None

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def is_safetensors_file(path: Path) -> bool:
    """True when the file is named `.safetensors` (so a broken header gets the safetensors reader's
    message) or its first bytes are a safetensors header whatever its name says. Only regular files
    are opened: a FIFO or device is refused before any read could block."""
    with open_regular_file(path) as handle:
        try:
            head = handle.read(9)
            size = os.fstat(handle.fileno()).st_size
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    return path.suffix == ".safetensors" or looks_like_safetensors(head, size)


def open_weight_file(path: Path) -> TensorSource:
    """A safetensors file memory-mapped, a GGUF file through its validated reader (`gguf.gguf_model_source`: the
    quantized blocks stay in the mapping), anything else through the restricted `.ckpt` unpickler."""
    if is_gguf_file(path):
        return gguf_model_source(path)
    if is_safetensors_file(path):
        source = SafetensorsSource(path)
        try:
            check_comfy_fp8(source, path)
        except CheckpointError:
            source.close()
            raise
        return source
    return DictSource(state_dict_from_ckpt(load_ckpt(path)))


COMFY_QUANT, WEIGHT_SCALE = ".comfy_quant", ".weight_scale"  # ComfyUI's mixed-precision layer marker and weight scale
COMFY_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
FILE_FLOAT8 = frozenset(getattr(torch, name) for name in COMFY_FP8_FORMATS if hasattr(torch, name))


def check_comfy_fp8(source: TensorSource, path: Path) -> None:
    """ComfyUI's mixed-precision files (`qwen_3_4b_fp8_mixed`, `*_fp8mixed`: per layer an fp8 `weight`, its
    `weight_scale`, an `input_scale` and a `comfy_quant` JSON marker) are read when every quantized layer is plain fp8
    with one scale per tensor or per output row (the op layer computes weight * scale: `pipelines.weight_storage`);
    any other layer format (nvfp4, mxfp8, int8, rotated) or a scale beside a weight that is not fp8 is one line."""
    keys = set(source.keys())
    for key in sorted(keys):
        if key.endswith(COMFY_QUANT):
            raw = source.get(key)
            try:
                described = json.loads(bytes(raw.flatten().tolist()).decode("utf-8")) if raw.numel() <= 4096 else None
            except (ValueError, UnicodeDecodeError):
                described = None
            kind = described.get("format") if isinstance(described, dict) else None
            if kind not in COMFY_FP8_FORMATS or described.get("convrot"):  # type: ignore[union-attr]
                shown = f"format {str(kind)[:40]!r}" if kind else "an unreadable marker"
                raise CheckpointError(f"{path}: layer {key.removesuffix(COMFY_QUANT)[:120]} is ComfyUI quantized with {shown}, which "
                                      "this version does not read (it reads fp8 layers: float8_e4m3fn with a weight_scale)")  # fmt: skip
        elif key.endswith(WEIGHT_SCALE):
            weight = key.removesuffix(WEIGHT_SCALE) + ".weight"
            if weight not in keys or source.dtype(weight) not in FILE_FLOAT8:
                raise CheckpointError(f"{path}: {key[:120]} scales a weight that is not fp8, which this version does not read")
            rows = source.shape(weight)[0] if source.shape(weight) else 0
            if math.prod(source.shape(key)) not in (1, rows):
                raise CheckpointError(f"{path}: {key[:120]} has shape {source.shape(key)}; one scale per tensor or per row "
                                      f"of its {source.shape(weight)} weight is read")  # fmt: skip


def normalize_keys(source: TensorSource, path: Path) -> TensorSource:
    """The source with every key in `canonical_key` form: the one place key spellings are unified. An
    OpenCLIP projection written as a Linear weight (`text_projection.weight`, as diffusers' SDXL conversion
    script does) becomes open_clip's `text_projection`, transposed."""
    recipes: dict[str, tuple[str, tuple[str, ...]]] = {}
    for key in source.keys():
        name, op = canonical_key(key), "same"
        if key.endswith(".model.text_projection.weight"):
            name, op = key[: -len(".weight")], "transpose"
        if name in recipes:
            raise CheckpointError(f"{path} holds {recipes[name][1][0]!r} and {key!r}, two spellings of one tensor")
        recipes[name] = (op, (key,))
    if all(op == "same" and name == keys[0] for name, (op, keys) in recipes.items()):
        return source
    return ComputedSource(source, recipes)


def open_diffusers_folder(folder: Path) -> Checkpoint:
    """The loaded parts of a diffusers model (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`), renamed
    to LDM/SGM keys, with the folder's configs kept for `model_config`."""
    info = read_diffusers_folder(folder)
    parts = [part_source(info, part, open_weight_file(part.weight_file)) for part in info.parts.values()]
    return Checkpoint(ChainSource(parts), info.path, info.tokenizer, info)


def source_metadata(source: TensorSource) -> dict[str, str]:
    """A safetensors file's `__metadata__` through any renaming views ({} for other sources)."""
    while not hasattr(source, "metadata") and hasattr(source, "inner"):
        source = source.inner
    return dict(getattr(source, "metadata", None) or {})


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Open a CompVis `.ckpt`, a single-file `.safetensors` or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        return open_diffusers_folder(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    return Checkpoint(normalize_keys(open_weight_file(path), path), path)


def model_config(checkpoint: Checkpoint, shapes: dict[str, tuple[int, ...]], family: str | None = None) -> ModelConfig:
    """The model a checkpoint states: a diffusers folder's config files, else read off a single file's shapes."""
    if checkpoint.folder is not None:
        return folder_model_config(checkpoint.folder)
    return infer_config(shapes, family)


def ema_source(source: TensorSource) -> TensorSource:
    """The UNet taken from the EMA copy: `model_ema.diffusion_modelinput_blocks00weight` stands for
    `model.diffusion_model.input_blocks.0.0.weight` (LDM's LitEma drops the dots)."""
    present = set(source.keys())
    names = {}
    for key in source.keys():
        if not key.startswith(UNET_PREFIX):
            names[key] = key
            continue
        names[key] = ema_key(key)
        if names[key] not in present:
            raise CheckpointFieldError.about("ema", "finds no EMA weights in this checkpoint (no model_ema.* keys for the UNet)")
    return RenamedSource(source, names)


def model_view(source: TensorSource, model_keys: set[str]) -> TensorSource:
    """The source under the model's own key names. The model's CLIP keys follow the installed
    transformers (with or without `text_model.`); the source's are canonical, so each model key is
    matched through the same `canonical_key`. Keys the model lacks keep their names for the report."""
    names = {key: key for key in source.keys()}
    for key in model_keys:
        canonical = canonical_key(key)
        if canonical != key and canonical in names:
            names[key] = names.pop(canonical)
    return RenamedSource(source, names)


@dataclass
class LoadReport:
    """What strict loading found; `known_extras` are skipped on purpose (schedule buffers, EMA...)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    known_extras: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {few(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {few(self.unexpected)}")
        if self.mismatched:
            parts.append(
                f"{len(self.mismatched)} mis-shaped: "
                + few([f"{k} {tuple(a)} in file vs {tuple(b)} in model" for k, a, b in self.mismatched])
            )
        return "; ".join(parts) if parts else "all keys matched"


def fits(file_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> bool:
    """Equal, or equal but for trailing 1s (diffusers stores 1x1 convs of the VAE attention as Linear)."""
    return tuple(file_shape) == tuple(model_shape) or (
        tuple(model_shape[: len(file_shape)]) == tuple(file_shape) and all(d == 1 for d in model_shape[len(file_shape) :])
    )


def check_keys(
    source: TensorSource, expected: dict[str, tuple[int, ...]], unused: dict[str, str] | None = None
) -> LoadReport:
    """Compare a source with the model's parameter shapes, LDM names on both sides. `unused` maps key
    prefixes the family carries but never runs to a reason (counted as known extras)."""
    report = LoadReport()
    present = set(source.keys())
    for key, shape in expected.items():
        if key not in present:
            report.missing.append(key)
        elif not fits(source.shape(key), shape):
            report.mismatched.append((key, source.shape(key), shape))
    for key in source.keys():
        if key in expected:
            continue
        reason = known_extra_key(key) or next((why for prefix, why in (unused or {}).items() if key.startswith(prefix)), None)
        if reason:
            report.known_extras[reason] = report.known_extras.get(reason, 0) + 1
        else:
            report.unexpected.append(key)
    return report


@dataclass
class LoadedModel:
    """A model built on the meta device (no memory yet), the tensors to fill it, and the report."""

    model: nn.Module
    config: ModelConfig
    checkpoint: Checkpoint
    source: TensorSource
    report: LoadReport


def prepare_model(
    path: Path | str, *, config: ModelConfig | None = None, ema: bool = False, vae: Path | str | None = None,
    parts_from: Path | str | None = None, text_encoders: tuple[Path | str, ...] = (),
) -> LoadedModel:
    """Open, detect the family, build the module tree on `meta`, and check every key strictly; `vae`
    (`--vae FILE`) replaces the checkpoint's VAE; a denoiser-only file gets its other parts from `parts_from`,
    `vae` and `text_encoders` (`weights.parts`). Weights are copied in later by `materialize`, by whoever
    decides where they live."""
    from optimized_sd.models.sd import LatentDiffusion
    from optimized_sd.weights.parts import with_parts

    checkpoint = open_checkpoint(path)
    source, vae = with_parts(checkpoint.source, checkpoint.path, parts_from=parts_from, vae=vae, text_encoders=text_encoders)
    checkpoint.source = source
    shapes = source.shapes()
    family = detect_family(shapes)
    if ema:
        source = ema_source(source)
        shapes = source.shapes()
    config = config or model_config(checkpoint, shapes, family)
    with torch.device("meta"):
        model = LatentDiffusion(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source = model_view(source, set(expected))
    report = check_keys(source, expected, unused_keys(shapes, config))
    if not report.ok:
        name = FAMILY_NAMES.get(config.family, config.family)
        raise CheckpointError(f"{checkpoint.path} does not match an {name} model: {report.summary()}")
    if vae is not None:
        from optimized_sd.weights.vae_file import with_vae_file

        source = with_vae_file(source, vae, expected)
    return LoadedModel(model, config, checkpoint, source, report)


def tensors_of(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers by local name (what a state dict would hold)."""
    return dict(module.state_dict(keep_vars=True))


def materialize(
    module: nn.Module,
    prefix: str,
    source: TensorSource,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Replace `module`'s tensors by copies of the source's (LDM key = prefix + local name), on
    `device`, floating tensors cast to `dtype`. Returns the bytes placed. Integer buffers keep their
    dtype."""
    placed = 0
    available = set(source.keys())
    for name, current in tensors_of(module).items():
        key = prefix + name
        if key not in available:  # buffers such as CLIP's position_ids, built by the module itself
            continue
        value = source.get(key)
        target_dtype = dtype if value.is_floating_point() else value.dtype
        value = value.reshape(current.shape).to(device=device, dtype=target_dtype, copy=True)
        set_tensor(module, name, value)
        placed += value.numel() * value.element_size()
    return placed

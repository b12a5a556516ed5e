"""Open any supported checkpoint as an LDM-named tensor source, check it strictly against the
model, and copy its tensors into modules (all at once, or group by group for the memory engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from optimized_sd.config import FAMILY_NAMES, ModelConfig
from optimized_sd.errors import CheckpointError
from optimized_sd.weights.family import CLIP_PREFIX as TEXT_PREFIX
from optimized_sd.weights.family import EMBEDDERS_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from optimized_sd.weights.infer import indices, infer_config, unused_keys
from optimized_sd.weights.keymap import openclip_recipes, rename, unet_prefixes, vae_prefixes
from optimized_sd.weights.sources import (
    ChainSource,
    ComputedSource,
    DictSource,
    RenamedSource,
    SafetensorsSource,
    TensorSource,
)

CLIP_TOWER_PREFIXES = (TEXT_PREFIX, EMBEDDERS_PREFIX + "0.transformer.")  # SD 1.x's and SDXL's CLIP ViT-L

DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


@dataclass
class Checkpoint:
    """An opened checkpoint: LDM-named tensors plus what is known about the file."""

    source: TensorSource
    path: Path
    tokenizer_dir: Path | None = None

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def open_weight_file(path: Path) -> TensorSource:
    """A `.safetensors` file memory-mapped, anything else through the restricted `.ckpt` unpickler."""
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    from optimized_sd.weights.ckpt import load_ckpt, state_dict_from_ckpt

    return DictSource(state_dict_from_ckpt(load_ckpt(path)))


def find_weight_file(folder: Path) -> Path:
    for name in DIFFUSERS_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"diffusers folder part {folder} holds no weight file ({', '.join(DIFFUSERS_WEIGHT_FILES)})")


def unet_config_from_diffusers(source: TensorSource):
    """Block counts read off diffusers names, so the mapping table has the right indices."""
    shapes = source.shapes()
    levels = indices(shapes, r"down_blocks\.(\d+)\.")
    res = indices(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")
    attention = tuple(2**level for level in levels if f"down_blocks.{level}.attentions.0.proj_in.weight" in shapes)
    from optimized_sd.config import UNetConfig

    return UNetConfig(num_res_blocks=len(res), channel_mult=tuple(1 for _ in levels), attention_resolutions=attention)


def read_json(path: Path) -> dict:
    """A diffusers config file as a dict ({} when absent or unreadable: shapes then decide)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def diffusers_text_sources(folder: Path) -> list[TensorSource]:
    """A diffusers folder's text encoder(s) under their LDM/SGM names, by family:
    SD 1.x `text_encoder` (CLIP, quick GELU) -> `cond_stage_model.transformer.`;
    SD 2.x `text_encoder` (OpenCLIP ViT-H saved as CLIP, exact GELU) -> `cond_stage_model.model.`;
    SDXL `text_encoder` + `text_encoder_2` -> `conditioner.embedders.0.transformer.` + `.1.model.`;
    SDXL refiner `text_encoder_2` alone -> `conditioner.embedders.0.model.`."""
    first, second = folder / "text_encoder", folder / "text_encoder_2"
    if second.is_dir():
        big_g = open_weight_file(find_weight_file(second))
        if not first.is_dir():
            return [ComputedSource(big_g, openclip_recipes(big_g.keys(), EMBEDDERS_PREFIX + "0.model."))]
        clip_l = open_weight_file(find_weight_file(first))
        return [
            RenamedSource(clip_l, {EMBEDDERS_PREFIX + "0.transformer." + key: key for key in clip_l.keys()}),
            ComputedSource(big_g, openclip_recipes(big_g.keys(), EMBEDDERS_PREFIX + "1.model.")),
        ]
    if not first.is_dir():
        raise CheckpointError(f"{folder} is not a diffusers model folder: it has no text_encoder/ subfolder")
    text = open_weight_file(find_weight_file(first))
    if read_json(first / "config.json").get("hidden_act") == "gelu":  # OpenCLIP's exact GELU: SD 2.x
        return [ComputedSource(text, openclip_recipes(text.keys(), OPENCLIP_PREFIX))]
    return [RenamedSource(text, {TEXT_PREFIX + key: key for key in text.keys()})]


def open_diffusers_folder(folder: Path) -> Checkpoint:
    """`unet/`, `vae/`, `text_encoder/` (and `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`) of a
    diffusers model, renamed to LDM/SGM keys."""
    from optimized_sd.config import VAEConfig

    for part in ("unet", "vae"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder} is not a diffusers model folder: it has no {part}/ subfolder")
    unet = open_weight_file(find_weight_file(folder / "unet"))
    vae = open_weight_file(find_weight_file(folder / "vae"))
    unet_names = rename(unet.keys(), unet_prefixes(unet_config_from_diffusers(unet)), UNET_PREFIX)
    vae_levels = indices(vae.shapes(), r"encoder\.down_blocks\.(\d+)\.")
    vae_res = indices(vae.shapes(), r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    vae_table = vae_prefixes(VAEConfig(ch_mult=tuple(1 for _ in vae_levels), num_res_blocks=len(vae_res)))
    vae_names = rename(vae.keys(), vae_table, VAE_PREFIX)
    source = ChainSource([RenamedSource(unet, unet_names), RenamedSource(vae, vae_names), *diffusers_text_sources(folder)])
    tokenizer = folder / "tokenizer"
    return Checkpoint(source, folder, tokenizer if tokenizer.is_dir() else None)


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
    return Checkpoint(open_weight_file(path), path)


def ema_source(source: TensorSource) -> TensorSource:
    """The UNet taken from the EMA copy: `model_ema.diffusion_modelinput_blocks00weight` stands for
    `model.diffusion_model.input_blocks.0.0.weight` (LDM's LitEma drops the dots)."""
    present = set(source.keys())
    names = {}
    for key in source.keys():
        if not key.startswith(UNET_PREFIX):
            names[key] = key
            continue
        names[key] = "model_ema.diffusion_model" + key[len(UNET_PREFIX) :].replace(".", "")
        if names[key] not in present:
            raise CheckpointError("--ema: this checkpoint has no EMA weights (no model_ema.* keys for the UNet)")
    return RenamedSource(source, names)


def align_text_keys(source: TensorSource, model_keys: set[str]) -> TensorSource:
    """Text-tower keys in the form this model's modules use: CLIP keys come with or without `text_model.`
    depending on the transformers version that saved them; OpenCLIP's projection comes as open_clip's
    `text_projection` or as the Linear `text_projection.weight` (transposed) diffusers' script writes."""
    recipes: dict[str, tuple[str, tuple[str, ...]]] = {}
    for key in source.keys():
        target, op = key, "same"
        prefix = next((p for p in CLIP_TOWER_PREFIXES if key.startswith(p)), None)
        if prefix is not None and key not in model_keys:
            rest = key[len(prefix) :]
            flipped = rest[len("text_model.") :] if rest.startswith("text_model.") else "text_model." + rest
            if prefix + flipped in model_keys:
                target = prefix + flipped
        elif key.endswith(".model.text_projection.weight") and key[: -len(".weight")] in model_keys:
            target, op = key[: -len(".weight")], "transpose"
        recipes[target] = (op, (key,))
    return ComputedSource(source, recipes)


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
    from optimized_sd.weights.family import known_extra_key

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
    path: Path | str, *, config: ModelConfig | None = None, ema: bool = False, vae: Path | str | None = None
) -> LoadedModel:
    """Open, detect the family, build the module tree on `meta`, and check every key strictly; `vae`
    (`--vae FILE`) replaces the checkpoint's VAE. Weights are copied in later by `materialize`, by
    whoever decides where they live."""
    from optimized_sd.models.sd import LatentDiffusion
    from optimized_sd.weights.family import detect_family

    checkpoint = open_checkpoint(path)
    source = checkpoint.source
    shapes = source.shapes()
    family = detect_family(shapes)
    if ema:
        source = ema_source(source)
        shapes = source.shapes()
    config = config or infer_config(shapes, family)
    with torch.device("meta"):
        model = LatentDiffusion(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source = align_text_keys(source, set(expected))
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


def set_tensor(module: nn.Module, dotted: str, value: Tensor) -> None:
    """Swap a parameter or buffer for another tensor (no autograd: inference only)."""
    *path, leaf = dotted.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


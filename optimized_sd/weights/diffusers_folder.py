"""A diffusers model folder: which file holds each part's weights, how its keys map to LDM names, and
the model configuration its `config.json` files state.

The folder's JSON configs are the truth for that folder (head counts, for one, are not visible in
tensor shapes); the strict loader then checks every tensor's shape against the model built from them.
Single files have no such configs and are read by `infer.infer_config` instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from optimized_sd.config import ModelConfig, OpenCLIPConfig, TextEncoderConfig, UNetConfig, VAEConfig
from optimized_sd.errors import CheckpointError
from optimized_sd.families import registry
from optimized_sd.families.names import SD1
from optimized_sd.families.registry import FamilyRecord, TextTower
from optimized_sd.weights.family import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    canonical_key,
    check_label_width,
)
from optimized_sd.weights.keymap import openclip_recipes, rename, unet_prefixes, vae_prefixes
from optimized_sd.weights.sources import ComputedSource, RenamedSource, TensorSource

__all__ = [
    "DIFFUSERS_WEIGHT_FILES",
    "DiffusersFolder",
    "DiffusersPart",
    "find_weight_file",
    "folder_model_config",
    "ldm_names",
    "part_source",
    "read_diffusers_folder",
]

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"

# Weight file names in the order they are preferred: safetensors first, full precision before fp16 variants.
DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)

Config = Mapping[str, Any]


@dataclass(frozen=True)
class DiffusersPart:
    """One weight-bearing component folder (`unet/`, `vae/`, `text_encoder/`...)."""

    name: str
    weight_file: Path
    config: Config
    config_path: Path


@dataclass(frozen=True)
class DiffusersFolder:
    """What a diffusers folder holds, read from its JSON files; no tensor is read here."""

    path: Path
    pipeline_class: str
    parts: dict[str, DiffusersPart]  # the parts this version loads, by folder name
    scheduler: Config | None
    tokenizer: Path | None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a one-line CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def pipeline_class(folder: Path) -> str:
    """The `_class_name` a diffusers folder's model_index.json names ("" when there is none or it cannot be read):
    what the multi-file families claim a folder by."""
    try:
        return str(read_json(folder / "model_index.json").get("_class_name", ""))
    except (CheckpointError, OSError):
        return ""


def find_weight_file(folder: Path) -> Path:
    """The one weight file the loader reads for a component folder (first of DIFFUSERS_WEIGHT_FILES
    present). Whatever is there is chosen, not only regular files: the reader then refuses a FIFO or
    device by name instead of the folder looking empty."""
    for name in DIFFUSERS_WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"diffusers folder part {folder} holds no weight file ({', '.join(DIFFUSERS_WEIGHT_FILES)})")


# --- reading a folder's configs --------------------------------------------------------------------


def _value(config: Config, path: Path, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """`config[name]` checked to be of `kind` (bools are not ints here); `default` when absent or null."""
    value = config.get(name)
    if value is None:
        if default is ...:
            raise CheckpointError(f"{path}: {name} is missing")
        return default
    wrong_bool = isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    if wrong_bool or not isinstance(value, kind):
        raise CheckpointError(f"{path}: {name} is {value!r}, of the wrong type")
    return value


def _one_per_level(config: Config, path: Path, name: str, levels: int, default: int | None = None) -> int:
    """An int, or a per-level list of equal ints (newer diffusers writes lists); the SD 1.x modules take one value."""
    value = _value(config, path, name, (int, list), default)
    if isinstance(value, int):
        return value
    if len(value) != levels or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{path}: {name} {value!r} is not one whole number per level ({levels} levels)")
    if len(set(value)) != 1:
        raise CheckpointError(f"{path}: {name} {value!r} differs per level, which the SD 1.x modules cannot build")
    return value[0]


def _widths(config: Config, path: Path) -> tuple[int, tuple[int, ...]]:
    """(base width, multipliers) from `block_out_channels`."""
    widths = _value(config, path, "block_out_channels", list)
    if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise CheckpointError(f"{path}: block_out_channels {widths!r} is not a list of positive whole numbers")
    if any(w % widths[0] for w in widths):
        raise CheckpointError(f"{path}: block_out_channels {widths!r} are not multiples of the first width")
    return widths[0], tuple(w // widths[0] for w in widths)


def _require(config: Config, path: Path, built_with: Mapping[str, Any]) -> None:
    """Refuse settings our modules hard-code differently, rather than compute something else in silence."""
    for name, expected in built_with.items():
        if name in config and config[name] != expected:
            raise CheckpointError(f"{path}: {name} is {config[name]!r}; this version builds the model with {expected!r}")


# What the SD 1.x UNet, VAE and CLIP text modules compute; a folder stating otherwise is refused.
_UNET_BUILT_WITH = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "cross_attention_norm": None,
}
_VAE_BUILT_WITH = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,
}
_TEXT_BUILT_WITH = {"layer_norm_eps": 1e-5}
# Settings that differ by family (use_linear_projection, addition_embed_type): its record's `diffusers` layout.
SIZE_EMBEDDING_DIM = 256  # SDXL's per-number size embedding width (models.conditioner builds it)
HEAD_CHANNELS = 64  # SD 2.x and SDXL UNets: one head per 64 channels
# DDPM beta schedules our samplers build (LDM's "linear" in sqrt space is diffusers' "scaled_linear").
_BETA_SCHEDULES = ("scaled_linear",)


def _attention_levels(config: Config, path: Path, levels: int) -> tuple[int, ...]:
    """Indices of the down levels whose block type has cross-attention (`CrossAttnDownBlock2D`)."""
    types = _value(config, path, "down_block_types", list)
    if len(types) != levels:
        raise CheckpointError(f"{path}: {len(types)} down_block_types for {levels} block_out_channels")
    return tuple(level for level, kind in enumerate(types) if str(kind).startswith("CrossAttn"))


def _check_up_blocks(config: Config, path: Path, attention: tuple[int, ...], levels: int) -> None:
    """The LDM UNet mirrors its down path: up level i attends exactly when down level levels-1-i does."""
    types = config.get("up_block_types")
    if types is None:
        return
    mirrored = tuple(levels - 1 - level for level, kind in enumerate(types) if str(kind).startswith("CrossAttn"))
    if len(types) != levels or sorted(mirrored) != sorted(attention):
        raise CheckpointError(f"{path}: up_block_types {types!r} do not mirror down_block_types, as the SD 1.x UNet needs")


def _unet_key_layout(part: DiffusersPart) -> UNetConfig:
    """Just what names UNet keys: levels, blocks per level, which levels attend. Read leniently so a
    folder of another family still renames to LDM keys and `detect_family` can say what it is."""
    config, path = part.config, part.config_path
    _, mult = _widths(config, path)
    res = _value(config, path, "layers_per_block", (int, list), 2)
    res = max(res) if isinstance(res, list) else res
    attention = _attention_levels(config, path, len(mult))
    return UNetConfig(num_res_blocks=res, channel_mult=mult, attention_resolutions=tuple(2**level for level in attention))


def folder_family(folder: DiffusersFolder) -> str:
    """The family whose record's text towers sit in the folder's text folders (SDXL base: `text_encoder` and
    `text_encoder_2`; refiner: `text_encoder_2` alone; SD 1.x / SD 2.x: `text_encoder`), told apart by each
    tower's kind (an exact-GELU tower saved as CLIP is OpenCLIP: SD 2.x)."""
    present = {name for name in OPTIONAL_PARTS if name in folder.parts}
    candidates = [r for r in registry.records() if r.diffusers is not None and {t.folder for t in r.towers} == present]

    def kind(tower: TextTower) -> str:
        gelu = tower.folder == "text_encoder_2" or folder.parts[tower.folder].config.get("hidden_act") == "gelu"
        return "open_clip" if gelu else "clip"

    exact = [record for record in candidates if all(kind(tower) == tower.kind for tower in record.towers)]
    if not exact and not candidates:
        raise CheckpointError(f"{folder.path}: no model family has text encoders in {', '.join(sorted(present))} alone")
    return (exact or candidates)[0].family_id


def folder_tower(record: FamilyRecord, name: str) -> TextTower | None:
    """The record's text tower whose weights a diffusers folder keeps in `name/`."""
    return next((tower for tower in record.towers if tower.folder == name), None)


def _heads_rule(config: Config, path: Path, name: str, widths: list[int], attention: tuple[int, ...]) -> None:
    """SD 2.x / SDXL UNets run one head per 64 channels; a folder stating other head counts is refused."""
    value = _value(config, path, name, (int, list))
    counts = value if isinstance(value, list) else [value] * len(widths)
    for level in attention:
        if counts[level] * HEAD_CHANNELS != widths[level]:
            raise CheckpointError(
                f"{path}: {name} {value!r} gives {widths[level]}/{counts[level]}-wide heads at level {level}; "
                f"this version builds {HEAD_CHANNELS}-wide heads"
            )


def unet_config(part: DiffusersPart, family: str = SD1) -> UNetConfig:
    """UNetConfig from `unet/config.json` (diffusers UNet2DConditionModel)."""
    config, path = part.config, part.config_path
    _require(config, path, _UNET_BUILT_WITH)
    record = registry.by_name(family)
    layout = record.diffusers
    if layout is None:
        raise CheckpointError(f"{path}: {record.display_name} models have no diffusers folder layout")
    _require(config, path, {"use_linear_projection": layout.linear_projection, "addition_embed_type": layout.addition_embed_type})
    addition = layout.addition_embed_type
    base, mult = _widths(config, path)
    levels = len(mult)
    attention = _attention_levels(config, path, levels)
    _check_up_blocks(config, path, attention, levels)
    # SD 1.x configs store the head COUNT as attention_head_dim (a diffusers naming slip it keeps for
    # compatibility); num_attention_heads, when set, is the count and wins, as in diffusers itself.
    heads = config.get("num_attention_heads")
    heads_name = "num_attention_heads" if heads is not None else "attention_head_dim"
    common = dict(
        in_channels=_value(config, path, "in_channels", int, 4),
        out_channels=_value(config, path, "out_channels", int, 4),
        model_channels=base,
        attention_resolutions=tuple(sorted((2**level for level in attention), reverse=True)),
        num_res_blocks=_one_per_level(config, path, "layers_per_block", levels, 2),
        channel_mult=mult,
        context_dim=_value(config, path, "cross_attention_dim", int),
    )
    if record.unet_heads is not None:  # heads counted, not 64 wide
        return UNetConfig(
            **common,
            num_heads=_one_per_level(config, path, heads_name, levels, 8),
            transformer_depth=_one_per_level(config, path, "transformer_layers_per_block", levels, 1),
        )
    _heads_rule(config, path, heads_name, [base * m for m in mult], attention)
    depth = _value(config, path, "transformer_layers_per_block", (int, list), 1)
    if isinstance(depth, list):  # levels without attention hold no layers (as a single file reads)
        depth = tuple(d if level in attention else 0 for level, d in enumerate(depth))
    adm = None
    if addition is not None:
        _require(config, path, {"addition_time_embed_dim": SIZE_EMBEDDING_DIM})
        adm = _value(config, path, "projection_class_embeddings_input_dim", int)
    return UNetConfig(
        **common,
        num_heads=-1,
        num_head_channels=HEAD_CHANNELS,
        use_linear_in_transformer=True,
        transformer_depth=depth,
        transformer_depth_middle=depth if isinstance(depth, int) else depth[-1],
        adm_in_channels=adm,
    )


def vae_config(part: DiffusersPart) -> VAEConfig:
    """VAEConfig from `vae/config.json` (diffusers AutoencoderKL); latent_channels is both LDM's
    z_channels and embed_dim (diffusers' quant convs keep the width)."""
    config, path = part.config, part.config_path
    _require(config, path, _VAE_BUILT_WITH)
    base, mult = _widths(config, path)
    latent = _value(config, path, "latent_channels", int, 4)
    return VAEConfig(
        in_channels=_value(config, path, "in_channels", int, 3),
        out_channels=_value(config, path, "out_channels", int, 3),
        ch=base,
        ch_mult=mult,
        num_res_blocks=_one_per_level(config, path, "layers_per_block", len(mult), 1),
        z_channels=latent,
        embed_dim=latent,
    )


def text_config(part: DiffusersPart) -> TextEncoderConfig:
    """TextEncoderConfig from `text_encoder/config.json` (transformers CLIPTextConfig); defaults are CLIPTextConfig's."""
    config, path = part.config, part.config_path
    _require(config, path, _TEXT_BUILT_WITH)
    return TextEncoderConfig(
        vocab_size=_value(config, path, "vocab_size", int, 49408),
        hidden_size=_value(config, path, "hidden_size", int, 512),
        intermediate_size=_value(config, path, "intermediate_size", int, 2048),
        num_hidden_layers=_value(config, path, "num_hidden_layers", int, 12),
        num_attention_heads=_value(config, path, "num_attention_heads", int, 8),
        max_position_embeddings=_value(config, path, "max_position_embeddings", int, 77),
        hidden_act=_value(config, path, "hidden_act", str, "quick_gelu"),
    )


def schedule_fields(folder: DiffusersFolder) -> dict[str, Any]:
    """ModelConfig's schedule fields from `scheduler/scheduler_config.json`; none when the file is absent."""
    if folder.scheduler is None:
        return {}
    config, path = folder.scheduler, folder.path / SCHEDULER_CONFIG
    schedule = _value(config, path, "beta_schedule", str, "scaled_linear")
    if schedule not in _BETA_SCHEDULES or config.get("trained_betas") is not None:
        raise CheckpointError(f"{path}: beta_schedule {schedule!r} (or trained_betas) is not supported; expected scaled_linear")
    defaults = ModelConfig()
    return {
        "linear_start": float(_value(config, path, "beta_start", (int, float), defaults.linear_start)),
        "linear_end": float(_value(config, path, "beta_end", (int, float), defaults.linear_end)),
        "timesteps": _value(config, path, "num_train_timesteps", int, defaults.timesteps),
        "prediction_type": _value(config, path, "prediction_type", str, defaults.prediction_type),
    }


def open_clip_config(part: DiffusersPart, family: str) -> OpenCLIPConfig:
    """OpenCLIPConfig from a CLIP text config that holds an OpenCLIP tower: SD 2.x's `text_encoder` (23 layers,
    all run, final norm) or SDXL's `text_encoder_2` (bigG: penultimate context, pooled through the projection)."""
    config, path = part.config, part.config_path
    _require(config, path, {**_TEXT_BUILT_WITH, "hidden_act": "gelu"})
    tower = folder_tower(registry.by_name(family), part.name)
    sdxl = tower is not None and tower.penultimate  # SGM's bigG: penultimate context, pooled through the projection
    return OpenCLIPConfig(
        vocab_size=_value(config, path, "vocab_size", int, 49408),
        width=_value(config, path, "hidden_size", int),
        heads=_value(config, path, "num_attention_heads", int),
        layers=_value(config, path, "num_hidden_layers", int),
        intermediate_size=_value(config, path, "intermediate_size", int),
        context_length=_value(config, path, "max_position_embeddings", int, 77),
        penultimate=sdxl,
        projection_dim=_value(config, path, "projection_dim", int) if sdxl else None,
    )


def folder_model_config(folder: DiffusersFolder) -> ModelConfig:
    """The whole ModelConfig a diffusers folder states (UNet, VAE, text encoder(s), scale factor, schedule)."""
    family = folder_family(folder)
    record = registry.by_name(family)
    vae = folder.parts["vae"]
    scale = _value(vae.config, vae.config_path, "scaling_factor", (int, float), ModelConfig().scale_factor)  # diffusers' default
    text: TextEncoderConfig | None = None
    open_clip: OpenCLIPConfig | None = None
    for tower in record.towers:
        if tower.kind == "clip":
            text = replace(text_config(folder.parts[tower.folder]), penultimate=tower.penultimate)
        else:
            open_clip = open_clip_config(folder.parts[tower.folder], family)
    unet = unet_config(folder.parts["unet"], family)
    check_label_width(family, unet.adm_in_channels, open_clip.projection_dim if open_clip is not None else None)
    return ModelConfig(
        unet=unet,
        vae=vae_config(vae),
        text=text,
        open_clip=open_clip,
        scale_factor=float(scale),
        family=family,
        **schedule_fields(folder),
    )


# --- names ----------------------------------------------------------------------------------------


def _unet_names(part: DiffusersPart, keys: list[str]) -> dict[str, str]:
    return rename(keys, unet_prefixes(_unet_key_layout(part)), UNET_PREFIX)


def _vae_names(part: DiffusersPart, keys: list[str]) -> dict[str, str]:
    _, mult = _widths(part.config, part.config_path)
    res = _value(part.config, part.config_path, "layers_per_block", (int, list), 1)
    layout = VAEConfig(ch_mult=mult, num_res_blocks=max(res) if isinstance(res, list) else res)
    return rename(keys, vae_prefixes(layout), VAE_PREFIX)


def _clip_names(prefix: str, keys: list[str]) -> dict[str, str]:
    return {canonical_key(prefix + key): key for key in keys}


def _text_names(part: DiffusersPart, keys: list[str]) -> dict[str, str]:
    return _clip_names(CLIP_PREFIX, keys)


# Component folder -> how its diffusers keys become LDM keys. The parts a folder of this version
# must have (the text encoders: one of them at least).
PART_NAMES: dict[str, Callable[[DiffusersPart, list[str]], dict[str, str]]] = {
    "unet": _unet_names,
    "vae": _vae_names,
    "text_encoder": _text_names,
}
OPTIONAL_PARTS = ("text_encoder", "text_encoder_2")


def part_source(folder: DiffusersFolder, part: DiffusersPart, source: TensorSource) -> TensorSource:
    """A part's tensors under LDM/SGM names, a text tower's under its record's prefix. OpenCLIP towers saved as
    CLIP (SD 2.x's `text_encoder`, SDXL's `text_encoder_2`) get open_clip names with q, k, v fused
    (`keymap.openclip_recipes`)."""
    tower = folder_tower(registry.by_name(folder_family(folder)), part.name)
    if tower is not None:
        return tower_source(tower, source)
    return RenamedSource(source, ldm_names(part, source.keys()))


def tower_source(tower: TextTower, source: TensorSource) -> TensorSource:
    """A transformers CLIP text model's tensors (a diffusers text_encoder/, or ComfyUI's clip_l / clip_g file) under
    the tower's single-file names: open_clip's with q, k, v fused for an OpenCLIP tower, CLIP's prefixed else."""
    if tower.kind == "open_clip":
        return ComputedSource(source, openclip_recipes(source.keys(), tower.prefix))
    return RenamedSource(source, _clip_names(tower.prefix, source.keys()))


def ldm_names(part: DiffusersPart, keys: list[str]) -> dict[str, str]:
    """LDM name -> file key for a part's keys; keys no table covers keep a visible `part/key` name,
    so the strict loader reports them instead of dropping them."""
    names = PART_NAMES[part.name](part, keys)
    covered = set(names.values())
    names.update({f"{part.name}/{key}": key for key in keys if key not in covered})
    return names


def read_diffusers_folder(folder: Path) -> DiffusersFolder:
    """Read `model_index.json`, each loaded part's `config.json` and weight-file choice, and the
    scheduler config when present. Raises a one-line CheckpointError naming the missing or bad file."""
    folder = Path(folder)
    if not (folder / MODEL_INDEX).is_file():
        raise CheckpointError(f"{folder} is a folder without {MODEL_INDEX}; pass a checkpoint file or a diffusers folder")
    index = read_json(folder / MODEL_INDEX)
    parts = {}
    if not any((folder / name).is_dir() for name in OPTIONAL_PARTS):
        raise CheckpointError(f"{folder} is not a diffusers model folder: it has no text_encoder/ subfolder")
    for name in [*PART_NAMES, "text_encoder_2"]:
        if name in OPTIONAL_PARTS and not (folder / name).is_dir():
            continue
        if not (folder / name).is_dir():
            raise CheckpointError(f"{folder} is not a diffusers model folder: it has no {name}/ subfolder")
        config_path = folder / name / "config.json"
        parts[name] = DiffusersPart(name, find_weight_file(folder / name), read_json(config_path), config_path)
    scheduler_path = folder / SCHEDULER_CONFIG
    tokenizer = folder / "tokenizer"
    return DiffusersFolder(
        path=folder,
        pipeline_class=str(index.get("_class_name", "unknown pipeline")),
        parts=parts,
        scheduler=read_json(scheduler_path) if scheduler_path.exists() else None,
        tokenizer=tokenizer if tokenizer.is_dir() else None,
    )

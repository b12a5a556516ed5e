"""Open any supported checkpoint as an LDM-named tensor source, check it strictly against the
model, and copy its tensors into modules (all at once, or group by group for the memory engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from optimized_sd.config import ModelConfig
from optimized_sd.errors import CheckpointError
from optimized_sd.tensor_swap import set_tensor
from optimized_sd.weights.family import CLIP_PREFIX as TEXT_PREFIX
from optimized_sd.weights.family import UNET_PREFIX, VAE_PREFIX
from optimized_sd.weights.infer import indices, infer_config
from optimized_sd.weights.keymap import rename, unet_prefixes, vae_prefixes
from optimized_sd.weights.sources import (
    ChainSource,
    DictSource,
    RenamedSource,
    SafetensorsSource,
    TensorSource,
)

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


def open_diffusers_folder(folder: Path) -> Checkpoint:
    """`unet/`, `vae/`, `text_encoder/` (and `tokenizer/`) of a diffusers model, renamed to LDM keys."""
    from optimized_sd.config import VAEConfig

    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder} is not a diffusers model folder: it has no {part}/ subfolder")
    unet = open_weight_file(find_weight_file(folder / "unet"))
    vae = open_weight_file(find_weight_file(folder / "vae"))
    text = open_weight_file(find_weight_file(folder / "text_encoder"))
    unet_names = rename(unet.keys(), unet_prefixes(unet_config_from_diffusers(unet)), UNET_PREFIX)
    vae_levels = indices(vae.shapes(), r"encoder\.down_blocks\.(\d+)\.")
    vae_res = indices(vae.shapes(), r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    vae_table = vae_prefixes(VAEConfig(ch_mult=tuple(1 for _ in vae_levels), num_res_blocks=len(vae_res)))
    vae_names = rename(vae.keys(), vae_table, VAE_PREFIX)
    text_names = {TEXT_PREFIX + key: key for key in text.keys()}
    source = ChainSource(
        [RenamedSource(unet, unet_names), RenamedSource(vae, vae_names), RenamedSource(text, text_names)]
    )
    tokenizer = folder / "tokenizer"
    return Checkpoint(source, folder, tokenizer if tokenizer.is_dir() else None)


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
    """CLIP keys come with or without `text_model.` depending on the transformers version that saved
    them; map each to whichever form this transformers' module uses."""
    names: dict[str, str] = {}
    for key in source.keys():
        target = key
        if key.startswith(TEXT_PREFIX) and key not in model_keys:
            rest = key[len(TEXT_PREFIX) :]
            flipped = rest[len("text_model.") :] if rest.startswith("text_model.") else "text_model." + rest
            if TEXT_PREFIX + flipped in model_keys:
                target = TEXT_PREFIX + flipped
        names[target] = key
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


def check_keys(source: TensorSource, expected: dict[str, tuple[int, ...]]) -> LoadReport:
    """Compare a source with the model's parameter shapes, LDM names on both sides."""
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
        reason = known_extra_key(key)
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


def prepare_model(path: Path | str, *, config: ModelConfig | None = None, ema: bool = False) -> LoadedModel:
    """Open, detect the family, build the module tree on `meta`, and check every key strictly.
    Weights are copied in later by `materialize`, by whoever decides where they live."""
    from optimized_sd.models.sd import LatentDiffusion
    from optimized_sd.weights.family import detect_family

    checkpoint = open_checkpoint(path)
    source = checkpoint.source
    shapes = source.shapes()
    detect_family(shapes)
    if ema:
        source = ema_source(source)
        shapes = source.shapes()
    config = config or infer_config(shapes)
    with torch.device("meta"):
        model = LatentDiffusion(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source = align_text_keys(source, set(expected))
    report = check_keys(source, expected)
    if not report.ok:
        raise CheckpointError(f"{checkpoint.path} does not match an SD 1.x model: {report.summary()}")
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

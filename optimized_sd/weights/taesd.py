"""Reading TAESD files (madebyollin's tiny autoencoders): the original halves (`taesd_decoder.pth`,
`taesdxl_encoder.safetensors`, ...: `nn.Sequential` state dicts) or diffusers' `AutoencoderTiny` (a file or
folder with `decoder.layers.N` / `encoder.layers.N` keys: the decoder's index is the original's less one, for
the original's weightless Clamp at 0). Which family a file serves is read off its latent width, and where
that cannot tell (SD and SDXL are both 4 wide) off its name, as ComfyUI and AUTOMATIC1111 name them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from optimized_sd.config import ModelConfig
from optimized_sd.errors import CheckpointError, CheckpointFieldError, FieldError
from optimized_sd.models.taesd import TinyDecoder, TinyEncoder
from optimized_sd.weights.sources import TensorSource

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


@dataclass(frozen=True)
class TaesdName:
    """A file-name prefix and the model families its files serve."""

    prefix: str
    families: tuple[str, ...]
    label: str
    latent_channels: int


# Longer prefixes first: `taesdxl_decoder` also starts with `taesd`.
TAESD_NAMES = (
    TaesdName("taesdxl", ("sdxl", "sdxl_refiner"), "SDXL", 4),
    TaesdName("taesd3", ("sd3",), "SD3", 16),
    TaesdName("taef1", ("flux",), "Flux", 16),
    TaesdName("taesd", ("sd1", "sd2"), "SD 1.x/2.x", 4),
)


@dataclass
class TinyAutoencoder:
    """What one TAESD file or folder held: a decoder, an encoder or both, on the CPU in float32 until placed."""

    path: Path
    decoder: TinyDecoder | None
    encoder: TinyEncoder | None

    @property
    def latent_channels(self) -> int:
        half = self.decoder if self.decoder is not None else self.encoder
        assert half is not None
        return half.latent_channels

    @property
    def modules(self) -> list[nn.Module]:
        return [m for m in (self.decoder, self.encoder) if m is not None]

    def weight_bytes(self, dtype_bytes: int) -> int:
        """Bytes of its weights at a compute dtype of `dtype_bytes` (what placing it costs)."""
        return sum(p.numel() for m in self.modules for p in m.parameters()) * dtype_bytes

    def place(self, device: torch.device, dtype: torch.dtype) -> TinyAutoencoder:
        for module in self.modules:
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self


def taesd_name(path: Path) -> TaesdName | None:
    """The family row named by the file (or, for a diffusers weight file, its folder): `taesd_*`, `taesdxl_*`..."""
    for name in (path.name, path.parent.name):
        for row in TAESD_NAMES:
            if re.match(rf"{row.prefix}(?![a-z0-9])", name.lower()):
                return row
    return None


def taesd_layout(keys: list[str]) -> str | None:
    """'decoder' or 'encoder' (an original half), 'diffusers' (AutoencoderTiny), or None (not TAESD)."""
    names = set(keys)
    if any(k.startswith(("decoder.layers.", "encoder.layers.")) for k in names):
        return "diffusers"
    if {"1.weight", "3.conv.0.weight"} <= names and "0.weight" not in names:
        return "decoder"  # index 0 is the weightless Clamp
    if {"0.weight", "1.conv.0.weight"} <= names:
        return "encoder"
    return None


def diffusers_tiny_folder(path: Path) -> bool:
    """A diffusers folder whose config names an AutoencoderTiny."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "AutoencoderTiny"
    except (OSError, ValueError, AttributeError):
        return False


def open_source(path: Path) -> TensorSource:
    from optimized_sd.weights.loading import find_weight_file, open_weight_file

    return open_weight_file(find_weight_file(path) if path.is_dir() else path)


def is_taesd(path: Path | str) -> bool:
    """Whether `path` (a `--vae` argument) holds a TAESD rather than a KL VAE, judged by its keys."""
    path = Path(path)
    if path.is_dir():
        return diffusers_tiny_folder(path)
    if not path.is_file():
        return False
    try:
        source = open_source(path)
    except CheckpointError:  # unreadable: the KL VAE loader reports it, as for any `--vae`
        return False
    try:
        return taesd_layout(source.keys()) is not None
    finally:
        source.close()


def halves(source: TensorSource, layout: str) -> dict[str, dict[str, str]]:
    """'decoder'/'encoder' -> {module key: file key} for the halves the file holds."""
    if layout != "diffusers":
        return {layout: {key: key for key in source.keys()}}
    found: dict[str, dict[str, str]] = {}
    for key in source.keys():
        half, _, rest = key.partition(".layers.")
        if half not in ("decoder", "encoder") or not rest:
            found.setdefault("unexpected", {})[key] = key
            continue
        index, _, tail = rest.partition(".")
        local = f"{int(index) + 1}.{tail}" if half == "decoder" and index.isdigit() else rest  # the Clamp shifts the decoder
        found.setdefault(half, {})[local] = key
    return found


def build_half(half: str, names: dict[str, str], source: TensorSource, field: str, path: Path) -> nn.Module:
    """The half with the file's tensors, its latent channels and width read off the first and last convs."""
    shapes = {local: tuple(source.shape(key)) for local, key in names.items()}
    try:
        if half == "decoder":
            width, channels = shapes["1.weight"][:2]
            module: nn.Module = TinyDecoder(channels, width)
        else:
            width = shapes["0.weight"][0]
            channels = shapes[f"{len(TinyEncoder()) - 1}.weight"][0]
            module = TinyEncoder(channels, width)
    except (KeyError, ValueError) as error:
        raise CheckpointFieldError.about(field, f"{path}: not a TAESD {half} (no {error})") from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [f"{k} {shapes[k]} vs {expected[k]}" for k in sorted(set(expected) & set(shapes)) if shapes[k] != expected[k]]
    problems = [f"{len(items)} {label}: {', '.join(items[:3])}" for label, items in
                (("mis-shaped", mismatched), ("missing", missing), ("unexpected", unexpected)) if items]
    if problems:
        raise CheckpointFieldError.about(field, f"{path} is not a TAESD {half}: {'; '.join(problems)}")
    module.load_state_dict({local: source.get(key).float() for local, key in names.items()})
    return module


def open_taesd(path: Path | str, field: str) -> TinyAutoencoder:
    """The TAESD at `path` (an original half, or a diffusers AutoencoderTiny file or folder), on the CPU in float32;
    `field` is the option that gave it (vae, preview_decoder), which its errors name."""
    path = Path(path)
    if not path.exists():
        raise CheckpointFieldError.about(field, f"{path}: no such file")
    source = open_source(path)
    try:
        layout = taesd_layout(source.keys())
        if layout is None:
            keys = "no `1.weight`/`0.weight` Sequential keys or `decoder.layers.*`"
            raise CheckpointFieldError.about(field, f"{path}: not a TAESD file ({keys})")
        found = halves(source, layout)
        if "unexpected" in found:
            raise CheckpointFieldError.about(field, f"{path}: not a TAESD: unexpected keys {', '.join(sorted(found['unexpected'])[:3])}")
        built = {half: build_half(half, names, source, field, path) for half, names in found.items()}
    finally:
        source.close()
    tiny = TinyAutoencoder(path, built.get("decoder"), built.get("encoder"))  # type: ignore[arg-type]
    if tiny.decoder is not None and tiny.encoder is not None and tiny.decoder.latent_channels != tiny.encoder.latent_channels:
        raise CheckpointFieldError.about(field, f"{path}: its decoder and encoder disagree on the latent channels")
    return tiny


def check_taesd_fits(tiny: TinyAutoencoder, config: ModelConfig, field: str, *, needs_decoder: bool = True) -> None:
    """Refuse a TAESD of another latent width than the model's, or named for another family."""
    if needs_decoder and tiny.decoder is None:
        raise FieldError.about(field, f"{tiny.path.name}: a TAESD encoder, not a decoder (use {taesd_prefix(config.family)}_decoder)")
    channels = config.vae.embed_dim
    if tiny.latent_channels != channels:
        raise FieldError.about(
            field, f"{tiny.path.name} decodes {tiny.latent_channels}-channel latents; this {config.family_name} model's have {channels}"
        )
    named = taesd_name(tiny.path)
    if named is not None and config.family not in named.families:
        raise FieldError.about(
            field, f"{tiny.path.name} is a TAESD for {named.label} ({named.prefix}_*); this is an {config.family_name} model: "
            f"use {taesd_prefix(config.family)}_decoder"
        )


def taesd_prefix(family: str) -> str:
    """The file-name prefix of the TAESD for `family` (`taesd` for SD 1.x/2.x)."""
    return next((row.prefix for row in TAESD_NAMES if family in row.families), "taesd")


def find_taesd_decoder(folder: Path, family: str) -> Path | None:
    """The `<prefix>_decoder.*` file (or diffusers folder `<prefix>*`) for `family` in `folder`
    (AUTOMATIC1111's `VAE-approx/`, ComfyUI's `vae_approx/`), or None."""
    if not folder.is_dir():
        return None
    prefix = taesd_prefix(family)
    for entry in sorted(folder.iterdir()):
        named = taesd_name(entry) if entry.name.lower().startswith(prefix) else None
        if named is None or named.prefix != prefix:
            continue
        if entry.is_file() and entry.suffix.lower() in WEIGHT_SUFFIXES and "decoder" in entry.stem.lower():
            return entry
        if diffusers_tiny_folder(entry):
            return entry
    return None

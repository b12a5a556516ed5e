"""Flux.1's components from one or several files (BFL's `flux1-dev.safetensors`, `ae.safetensors`, a T5 and a
CLIP-L file; a ComfyUI all-in-one; diffusers transformer/VAE files): each part built on the meta device from
a config read off its tensors, checked strictly, and filled by `materialize` when its place is decided."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from optimized_sd.errors import CheckpointError
from optimized_sd.weights.flux_keys import FluxFile, flux_parts, identify_flux
from optimized_sd.weights.infer import infer_text, infer_vae
from optimized_sd.weights.loading import LoadReport, check_keys, materialize, open_weight_file
from optimized_sd.weights.sources import RenamedSource, TensorSource

SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's key (after the model's prefix) in its "fp8 scaled" files
PART_WORDS = {"transformer": "Flux transformer", "clip_l": "CLIP-L text encoder", "t5": "T5 text encoder", "vae": "Flux VAE"}


@dataclass
class FluxComponent:
    """One part on `meta` (no memory yet), its tensors under the module's own names, and the strict report."""

    name: str  # "transformer", "clip_l", "t5" or "vae"
    model: nn.Module
    source: TensorSource
    report: LoadReport


def open_flux_files(paths: Iterable[Path | str]) -> tuple[dict[str, TensorSource], dict[str, FluxFile]]:
    """The Flux parts found in `paths` under their modules' names, and what each file was found to be. A part
    found in two files is refused (which one was meant is not for us to guess)."""
    parts: dict[str, TensorSource] = {}
    found: dict[str, FluxFile] = {}
    origin: dict[str, Path] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        source = open_weight_file(path)
        refuse_scaled_fp8(source, path)
        info = identify_flux(source.shapes(), str(path))
        found[str(path)] = info
        for part, view in flux_parts(source, info).items():
            if part in parts:
                raise CheckpointError(f"{path} and {origin[part]} both hold a {PART_WORDS[part]}; give one of them")
            parts[part], origin[part] = view, path
    return parts, found


def refuse_scaled_fp8(source: TensorSource, path: Path) -> None:
    """ComfyUI's "fp8 scaled" files (a `scaled_fp8` marker, each fp8 weight times its own `.scale_weight` factor)
    are refused in one line: read as plain fp8 they would compute with wrongly scaled weights."""
    marker = next((key for key in source.keys() if key.endswith(SCALED_FP8_MARKER)), None)
    if marker is not None:
        raise CheckpointError(
            f"{path} is a ComfyUI scaled fp8 file ({marker!r}: fp8 weights with per-layer .scale_weight factors), "
            "which this version does not read; use an unscaled fp8 file (e.g. t5xxl_fp8_e4m3fn.safetensors) or a 16-bit one"
        )


def module_view(source: TensorSource, model_keys: Iterable[str], name_in_source: Callable[[str], str]) -> TensorSource:
    """`source` under the model's keys; source keys no model key claims keep their names (reported as unexpected)."""
    names = {key: key for key in source.keys()}
    present = set(names)
    for key in model_keys:
        wanted = name_in_source(key)
        if wanted in present:
            names.pop(wanted, None)
            names[key] = wanted
    return RenamedSource(source, names)


def checked(name: str, model: nn.Module, source: TensorSource, skip: Iterable[str] = ()) -> FluxComponent:
    """The component, or a one-line CheckpointError saying which keys do not fit."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if key not in set(skip)}
    report = check_keys(source, expected)
    if not report.ok:
        raise CheckpointError(f"the {PART_WORDS[name]} does not match its model: {report.summary()}")
    return FluxComponent(name, model, source, report)


def prepare_transformer(source: TensorSource) -> FluxComponent:
    from optimized_sd.models.flux import Flux, FluxConfig

    with torch.device("meta"):
        model = Flux(FluxConfig.from_shapes(source.shapes()))
    return checked("transformer", model, source)


def prepare_t5(source: TensorSource) -> FluxComponent:
    from optimized_sd.models.t5 import TIED_EMBEDDING, T5Config, T5Encoder

    with torch.device("meta"):
        model = T5Encoder(T5Config.from_shapes(source.shapes()))
    view = module_view(source, model.state_dict(), lambda key: key.removeprefix("transformer."))
    return checked("t5", model, view, skip=[TIED_EMBEDDING])


def prepare_clip_l(source: TensorSource) -> FluxComponent:
    """CLIP-L as SD's tower (`FrozenCLIPEmbedder`): Flux reads its pooled output (the end token's final state)."""
    from optimized_sd.models.text_encoder import FrozenCLIPEmbedder

    with torch.device("meta"):
        model = FrozenCLIPEmbedder(infer_text(source.shapes(), inner="text_model."))
    view = module_view(source, model.state_dict(), lambda key: "text_model." + key.removeprefix("transformer.").removeprefix("text_model."))
    return checked("clip_l", model, view)


def prepare_vae(source: TensorSource) -> FluxComponent:
    """The autoencoder alone (`encoder.*`, `decoder.*`), 16 latent channels and no quant convs for Flux."""
    from optimized_sd.models.vae import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(infer_vae(source.shapes(), prefix=""))
    return checked("vae", model, source)


PREPARE: dict[str, Callable[[TensorSource], FluxComponent]] = {
    "transformer": prepare_transformer,
    "t5": prepare_t5,
    "clip_l": prepare_clip_l,
    "vae": prepare_vae,
}


def prepare_flux(paths: Iterable[Path | str]) -> dict[str, FluxComponent]:
    """Every Flux part the files hold, built on `meta` and checked; nothing is read but headers."""
    parts, _ = open_flux_files(paths)
    return {name: PREPARE[name](source) for name, source in parts.items()}


def load_component(component: FluxComponent, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Fill the whole component on `device` in `dtype` (no streaming) and return its module in eval mode."""
    materialize(component.model, "", component.source, torch.device(device), dtype)
    tie = getattr(component.model, "tie_embedding", None)
    if tie is not None:
        tie()
    return component.model.eval()

"""Flux.2 key layouts and detection: the transformer from BFL's original file (`flux-2-klein-4b.safetensors`, with or
without ComfyUI's `model.diffusion_model.`) or a diffusers `Flux2Transformer2DModel` (renamed at load time: the
inverse of diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`), and the VAE from BFL's `ae.safetensors`
(LDM names, quant convs inside `encoder`/`decoder`) or a diffusers `AutoencoderKLFlux2` (`vae/` folder).

What the weights say: Flux.2 (shared `single_stream_modulation`, which Flux.1 has not: `identify_flux` refuses these
files and `identify_flux2` refuses Flux.1's, so no file is claimed twice), klein 4B or 9B (3072 or 4096 wide), or dev
(a guidance embedder, 6144 wide: not run here). Distilled klein and klein base have the same tensors: `klein_is_distilled`
decides from a flag, a diffusers folder's `model_index.json` or the file name."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from optimized_sd.errors import CheckpointError
from optimized_sd.weights.diffusers_folder import read_json
from optimized_sd.weights.family import VAE_PREFIX
from optimized_sd.weights.flux_keys import (
    COMFY_TRANSFORMER_PREFIX,
    DOUBLE_BLOCK_ATTENTION_NAMES,
    diffusers_transformer_recipes,
    strip_prefix,
)
from optimized_sd.weights.flux_loading import FluxComponent
from optimized_sd.weights.infer import infer_vae
from optimized_sd.weights.sources import ComputedSource, RenamedSource, TensorSource
from optimized_sd.weights.vae_file import vae_names
from optimized_sd.weights.zimage_keys import checked, open_weights

BFL_TELLTALE = "single_stream_modulation.lin.weight"  # diffusers' own Flux.2 telltale (CHECKPOINT_KEY_NAMES["flux2"])
DIFFUSERS_TELLTALE = "single_stream_modulation.linear.weight"
GUIDANCE_KEYS = ("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight")
WIDTH_KEYS = ("img_in.weight", "x_embedder.weight")
KLEIN_SIZES = {3072: "4B", 4096: "9B"}
DEV_WIDTH = 6144
VAE_TELLTALE = "bn.running_var"
VAE_UNUSED = {"bn.num_batches_tracked": "a batch-norm training counter"}

# diffusers Flux2Transformer2DModel -> BFL names (flux_keys' table format: a module maps `.weight`; a name ending
# in `.scale` is a whole key). q, k and v are concatenated back into `qkv`.
DOUBLE_BLOCK_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    *DOUBLE_BLOCK_ATTENTION_NAMES,
    ("img_mlp.0", ("ff.linear_in",)),
    ("img_mlp.2", ("ff.linear_out",)),
    ("txt_mlp.0", ("ff_context.linear_in",)),
    ("txt_mlp.2", ("ff_context.linear_out",)),
)
SINGLE_BLOCK_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_qkv_mlp_proj",)),
    ("linear2", ("attn.to_out",)),
    ("norm.query_norm.scale", ("attn.norm_q.weight",)),
    ("norm.key_norm.scale", ("attn.norm_k.weight",)),
)
TOP_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    ("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    ("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    ("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    ("final_layer.linear", ("proj_out",)),
)
FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # diffusers (scale, shift), BFL (shift, scale)
# BFL's `ae` keeps the quant convs inside encoder and decoder; LDM and diffusers (and our AutoencoderKL) at the top
BFL_VAE_RENAMES = (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv."))


@dataclass(frozen=True)
class Flux2File:
    """What a file holds for Flux.2: the transformer's layout, its key prefix and klein's size."""

    layout: str  # "bfl" or "diffusers"
    prefix: str  # "" or ComfyUI's "model.diffusion_model."
    hidden_size: int
    size: str  # "4B", "9B", "dev" (allowed only on request), or "<width> wide" for a width no release has


def identify_flux2(shapes: dict[str, tuple[int, ...]], name: str = "the checkpoint", allow_dev: bool = False) -> Flux2File:
    """The Flux.2 klein transformer a file with these tensor shapes holds; Flux.2 dev is refused by name (unless
    `allow_dev`: its layout is the same), and a file without Flux.2's shared single-stream modulation (Flux.1,
    anything else) is refused in one line."""
    layouts = (("bfl", "", BFL_TELLTALE), ("bfl", COMFY_TRANSFORMER_PREFIX, BFL_TELLTALE), ("diffusers", "", DIFFUSERS_TELLTALE))
    found = [(layout, prefix) for layout, prefix, telltale in layouts if prefix + telltale in shapes]
    if not found:
        raise CheckpointError(f"{name} holds no Flux.2 transformer (no {BFL_TELLTALE} or {DIFFUSERS_TELLTALE})")
    layout, prefix = found[0]
    width_key = prefix + WIDTH_KEYS[layout == "diffusers"]
    if len(shapes.get(width_key, ())) != 2:
        raise CheckpointError(f"{name} is a Flux.2 transformer without a 2-D {width_key}")
    hidden = shapes[width_key][0]
    dev = any(prefix + key in shapes for key in GUIDANCE_KEYS) or hidden == DEV_WIDTH
    if dev and not allow_dev:
        raise CheckpointError(f"{name} is Flux.2 [dev] ({hidden} wide, guidance-distilled), which this version does not run (klein runs)")
    return Flux2File(layout, prefix, hidden, "dev" if dev else KLEIN_SIZES.get(hidden, f"{hidden} wide"))


def klein_is_distilled(path: Path | str, base: bool | None = None) -> bool:
    """Whether a klein model is the step-distilled one (4 steps, no CFG) rather than the base (CFG): the weights
    cannot tell. `base` (a user flag) decides when given; then a diffusers folder's `model_index.json`
    (`is_distilled`, next to or above a `transformer/` folder); then the file or folder name (`...-base-...`)."""
    if base is not None:
        return not base
    path = Path(path)
    inside = [path] + [folder for folder in path.parents if folder.name == "transformer"][:1]  # a component of a folder
    for place in inside:
        index = (place if place.is_dir() and place.name != "transformer" else place.parent) / "model_index.json"
        if index.is_file():
            distilled = read_json(index).get("is_distilled")
            if isinstance(distilled, bool):
                return distilled
    names = [place.name if place.name != "transformer" else place.parent.name for place in inside]
    return not any("base" in re.split(r"[^a-z0-9]+", name.lower()) for name in names)


def flux2_transformer_view(source: TensorSource, name: str = "the checkpoint") -> TensorSource:
    """The Flux.2 transformer's tensors under BFL names (our `Flux2`'s); what may run is `identify_flux2`'s call."""
    info = identify_flux2(source.shapes(), name, allow_dev=True)
    if info.layout == "diffusers":
        recipes = diffusers_transformer_recipes(source.keys(), TOP_NAMES, DOUBLE_BLOCK_NAMES, SINGLE_BLOCK_NAMES, FINAL_ADALN)
        return ComputedSource(source, recipes)
    return strip_prefix(source, info.prefix) if info.prefix else source


def flux2_vae_names(keys: Iterable[str], source: TensorSource) -> dict[str, str]:
    """`Flux2Autoencoder` name -> file key for BFL's `ae` or a diffusers AutoencoderKLFlux2 (the `bn` statistics
    keep their names in both)."""
    keys = list(keys)
    names = {key: key for key in keys if key.startswith("bn.")}
    if any(key.startswith("encoder.down_blocks.") for key in keys):
        names.update({name[len(VAE_PREFIX) :]: key for name, key in vae_names(source).items()})
        return names
    for key in keys:
        name = key
        for old, new in BFL_VAE_RENAMES:
            if key.startswith(old):
                name = new + key[len(old) :]
        names.setdefault(name, key)
    return names


def flux2_vae_view(source: TensorSource, name: str = "the checkpoint") -> TensorSource:
    """The Flux.2 VAE's tensors under our `Flux2Autoencoder`'s names."""
    if VAE_TELLTALE not in source.keys():
        raise CheckpointError(f"{name} holds no Flux.2 VAE (no {VAE_TELLTALE}: the latent statistics Flux.2 normalises by)")
    return RenamedSource(source, flux2_vae_names(source.keys(), source))


def prepare_flux2_transformer(path: Path | str) -> FluxComponent:
    """The Flux.2 klein transformer in a file or a diffusers `transformer/` folder, on `meta`, checked."""
    from optimized_sd.models.flux2 import Flux2, Flux2Config

    weights = open_weights(path)
    identify_flux2(weights.shapes(), str(path))
    source = flux2_transformer_view(weights, str(path))
    with torch.device("meta"):
        model = Flux2(Flux2Config.from_shapes(source.shapes()))
    return checked("transformer", "Flux.2 transformer", model, source)


def prepare_flux2_vae(path: Path | str) -> FluxComponent:
    """The Flux.2 VAE in a file (`ae.safetensors`, `flux2-vae.safetensors`) or a diffusers `vae/` folder, on `meta`,
    checked."""
    from optimized_sd.models.flux2 import PATCH, Flux2Autoencoder

    source = flux2_vae_view(open_weights(path), str(path))
    with torch.device("meta"):
        model = Flux2Autoencoder(replace(infer_vae(source.shapes(), prefix=""), patch=PATCH))
    return checked("vae", "Flux.2 VAE", model, source, VAE_UNUSED)

"""Z-Image and Qwen3 key layouts and loading: the transformer from an original file (ComfyUI's
`z_image_turbo_bf16.safetensors`, with or without `model.diffusion_model.`) or a diffusers
`ZImageTransformer2DModel` (renamed at load time: the inverse of diffusers'
`convert_z_image_transformer_checkpoint_to_diffusers`), and the Qwen3 text encoder from `qwen_3_4b.safetensors`
(transformers' names, with or without `model.`) or a diffusers folder's `text_encoder/` (sharded files too).
Each part is built on `meta` from a config read off its tensors and checked strictly; `flux_loading.load_component`
fills it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from optimized_sd.errors import CheckpointError
from optimized_sd.weights.diffusers_folder import find_weight_file, read_json
from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX, Recipes, strip_prefix
from optimized_sd.weights.flux_loading import FluxComponent, module_view
from optimized_sd.weights.loading import check_keys, open_weight_file
from optimized_sd.weights.sources import ChainSource, ComputedSource, RenamedSource, TensorSource

ORIGINAL_TELLTALE = "layers.0.adaLN_modulation.0.weight"  # Lumina 2 has `.adaLN_modulation.1` (SiLU first)
DIFFUSERS_TELLTALE = "all_x_embedder.2-1.weight"
QWEN3_TELLTALE = "layers.0.self_attn.q_norm.weight"  # Qwen3 normalises q and k; Qwen2/2.5 do not
ZIMAGE_UNUSED = {"norm_final.weight": "Z-Image's unused top-level norm"}
PAD_TOKENS = ("x_pad_token", "cap_pad_token")  # top-level in the files; our `pads` module holds them

# diffusers name part -> original, applied to every key (diffusers' converter, read backwards)
DIFFUSERS_RENAMES = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
SEPARATE_QKV = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")
FUSED_QKV = ".attention.qkv.weight"


def diffusers_transformer_recipes(keys: Iterable[str]) -> Recipes:
    """Original name -> (op, diffusers keys): q, k and v concatenated into `qkv`, the rest renamed."""
    present = set(keys)
    recipes: Recipes = {}
    for key in present:
        if key.endswith(SEPARATE_QKV[0]):
            stem = key[: -len(SEPARATE_QKV[0])]
            parts = tuple(stem + leaf for leaf in SEPARATE_QKV)
            if all(part in present for part in parts):
                recipes[stem + FUSED_QKV] = ("cat", parts)
    covered = {name for _, names in recipes.values() for name in names}
    for key in present - covered:
        name = key
        for old, new in DIFFUSERS_RENAMES:
            name = name.replace(old, new)
        recipes[name] = ("same", (key,))
    return recipes


def zimage_transformer_view(source: TensorSource, name: str = "the checkpoint") -> TensorSource:
    """The Z-Image transformer's tensors under the original names (our `ZImageTransformer`'s)."""
    keys = set(source.keys())
    if DIFFUSERS_TELLTALE in keys:  # diffusers keeps the main layers' names: test its own first
        return ComputedSource(source, diffusers_transformer_recipes(keys))
    for prefix in ("", COMFY_TRANSFORMER_PREFIX):
        if prefix + ORIGINAL_TELLTALE in keys:
            return strip_prefix(source, prefix) if prefix else source
    raise CheckpointError(f"{name} holds no Z-Image transformer (no {ORIGINAL_TELLTALE} or {DIFFUSERS_TELLTALE})")


def model_names(source: TensorSource) -> TensorSource:
    """Original names -> our module's: the pad tokens under `pads.`."""
    return RenamedSource(source, {(f"pads.{key}" if key in PAD_TOKENS else key): key for key in source.keys()})


def qwen3_view(source: TensorSource, name: str = "the checkpoint") -> TensorSource:
    """A Qwen3 file's tensors under `Qwen3Model` names (`model.` dropped; `lm_head.*` kept as is)."""
    keys = source.keys()
    if QWEN3_TELLTALE not in keys and "model." + QWEN3_TELLTALE not in keys:
        raise CheckpointError(f"{name} holds no Qwen3 text encoder (no {QWEN3_TELLTALE}, with or without model.)")
    return RenamedSource(source, {key.removeprefix("model."): key for key in keys})


def open_weights(path: Path | str) -> TensorSource:
    """One weight file, or a component folder: its sharded safetensors (`*.safetensors.index.json`) or its
    one weight file."""
    path = Path(path)
    if not path.is_dir():
        return open_weight_file(path)
    for index in sorted(path.glob("*.safetensors.index.json")):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        shards = sorted({str(shard) for shard in weight_map.values()})
        if any(Path(shard).name != shard for shard in shards):
            raise CheckpointError(f"{index}: shard names must be file names in the folder")
        return ChainSource(open_weight_file(path / shard) for shard in shards)
    return open_weight_file(find_weight_file(path))


def checked(name: str, words: str, model: nn.Module, source: TensorSource, unused: dict[str, str] | None = None) -> FluxComponent:
    """The component, or a one-line CheckpointError saying which keys do not fit."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    report = check_keys(source, expected, unused)
    if not report.ok:
        raise CheckpointError(f"the {words} does not match its model: {report.summary()}")
    return FluxComponent(name, model, source, report)


def prepare_zimage_transformer(path: Path | str) -> FluxComponent:
    """The Z-Image transformer in a file or a diffusers `transformer/` folder, on `meta`, checked."""
    from optimized_sd.models.zimage import ZImageConfig, ZImageTransformer

    source = model_names(zimage_transformer_view(open_weights(path), str(path)))
    with torch.device("meta"):
        model = ZImageTransformer(ZImageConfig.from_shapes(source.shapes()))
    return checked("transformer", "Z-Image transformer", model, source, ZIMAGE_UNUSED)


def prepare_qwen3(path: Path | str, layers_read: Sequence[int] | None = None) -> FluxComponent:
    """The Qwen3 text encoder in a file or a diffusers `text_encoder/` folder, built up to the last layer read
    (None: Z-Image's second-to-last), on `meta`, checked; the rest of the file is known and never read."""
    from optimized_sd.models.qwen3 import Qwen3Config, Qwen3TextEncoder, zimage_layers

    source = qwen3_view(open_weights(path), str(path))
    config = Qwen3Config.from_shapes(source.shapes())
    with torch.device("meta"):
        model = Qwen3TextEncoder(config, zimage_layers(config) if layers_read is None else layers_read)
    keys = list(model.state_dict())
    scales = [key + "_scale" for key in keys if key.endswith(".weight")]  # a ComfyUI fp8 file's (`<layer>.weight_scale`)
    view = module_view(source, [*keys, *scales], lambda key: key.removeprefix("transformer."))
    return checked("qwen3", "Qwen3 text encoder", model, view, model.unused_keys())

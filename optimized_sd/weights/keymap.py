"""Key-mapping tables between the diffusers layout and the LDM layout our modules use.

The tables are generated from the model config (block counts decide indices), then applied by
longest-prefix match plus a small table of names inside each kind of block: no per-layer code."""

from __future__ import annotations

from collections.abc import Iterable

from optimized_sd.config import UNetConfig, VAEConfig

UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(config: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers UNet2DConditionModel module prefix -> (LDM prefix, inner-name table)."""
    per_level = config.num_res_blocks + 1
    levels = len(config.channel_mult)
    table: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        # SDXL's added (size/crop) embedding is LDM's label_emb: mapped so `detect_family` names the family.
        "add_embedding.linear_1.": ("label_emb.0.0.", {}),
        "add_embedding.linear_2.": ("label_emb.0.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET_NAMES),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET_NAMES),
    }
    for level in range(levels):
        for index in range(config.num_res_blocks):
            block = 1 + level * per_level + index
            table[f"down_blocks.{level}.resnets.{index}."] = (f"input_blocks.{block}.0.", UNET_RESNET_NAMES)
            table[f"down_blocks.{level}.attentions.{index}."] = (f"input_blocks.{block}.1.", {})
        if level != levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{(level + 1) * per_level}.0.op.", {})
    for up_level in range(levels):
        has_attention = 2 ** (levels - 1 - up_level) in config.attention_resolutions
        for index in range(per_level):
            block = up_level * per_level + index
            table[f"up_blocks.{up_level}.resnets.{index}."] = (f"output_blocks.{block}.0.", UNET_RESNET_NAMES)
            table[f"up_blocks.{up_level}.attentions.{index}."] = (f"output_blocks.{block}.1.", {})
        if up_level != levels - 1:
            last = up_level * per_level + config.num_res_blocks
            table[f"up_blocks.{up_level}.upsamplers.0.conv."] = (
                f"output_blocks.{last}.{2 if has_attention else 1}.conv.",
                {},
            )
    return table


def vae_prefixes(config: VAEConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers AutoencoderKL module prefix -> (LDM prefix, inner-name table)."""
    levels = len(config.ch_mult)
    table: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv.": ("quant_conv.", {}),
        "post_quant_conv.": ("post_quant_conv.", {}),
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        table[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        table[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        table[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", VAE_RESNET_NAMES)
        table[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", VAE_RESNET_NAMES)
        table[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION_NAMES)
    for level in range(levels):
        for index in range(config.num_res_blocks):
            table[f"encoder.down_blocks.{level}.resnets.{index}."] = (
                f"encoder.down.{level}.block.{index}.",
                VAE_RESNET_NAMES,
            )
        if level != levels - 1:
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = (f"encoder.down.{level}.downsample.conv.", {})
        ldm_level = levels - 1 - level  # diffusers counts decoder levels from the deepest
        for index in range(config.num_res_blocks + 1):
            table[f"decoder.up_blocks.{level}.resnets.{index}."] = (
                f"decoder.up.{ldm_level}.block.{index}.",
                VAE_RESNET_NAMES,
            )
        if ldm_level != 0:
            table[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = (f"decoder.up.{ldm_level}.upsample.conv.", {})
    return table


def rename(keys: Iterable[str], prefixes: dict[str, tuple[str, dict[str, str]]], ldm_prefix: str) -> dict[str, str]:
    """LDM name -> diffusers name for every key that a prefix covers (others are left out and are
    reported by the strict loader as unexpected)."""
    ordered = sorted(prefixes, key=len, reverse=True)
    result: dict[str, str] = {}
    for key in keys:
        for prefix in ordered:
            if key.startswith(prefix):
                target, inner_names = prefixes[prefix]
                rest = key[len(prefix) :]
                for old, new in inner_names.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                result[ldm_prefix + target + rest] = key
                break
    return result



CLIP_TO_OPENCLIP = (
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.", "ln_final."),
    ("encoder.layers.", "transformer.resblocks."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)
"""transformers CLIP text model names (less `text_model.`) -> open_clip names, applied in order, as diffusers'
conversion scripts do."""


def openclip_recipes(keys: Iterable[str], prefix: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """OpenCLIP name (under `prefix`) -> recipe over a diffusers `CLIPTextModel(WithProjection)`'s keys:
    q/k/v projections fused into `attn.in_proj_*` (q, k, v order, as `nn.MultiheadAttention`), the Linear
    `text_projection.weight` transposed into open_clip's `text_projection` (x @ P). position_ids is dropped.
    Keys may carry `text_model.` or not (transformers versions differ)."""
    recipes: dict[str, tuple[str, tuple[str, ...]]] = {}
    present = set(keys)
    for key in present:
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            recipes[prefix + "text_projection"] = ("transpose", (key,))
            continue
        if ".self_attn.q_proj." in key:
            parts = tuple(key.replace(".q_proj.", f".{name}_proj.") for name in "qkv")
            layer, leaf = key.split(".self_attn.q_proj.")
            recipes[prefix + openclip_name(layer) + f".attn.in_proj_{leaf}"] = ("cat", parts)
            continue
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        recipes[prefix + openclip_name(key)] = ("same", (key,))
    return recipes


def openclip_name(name: str) -> str:
    """A transformers CLIP text name (with or without `text_model.`) in open_clip's spelling."""
    name = name.removeprefix("text_model.")
    for old, new in CLIP_TO_OPENCLIP:
        name = name.replace(old, new)
    return name


def clip_module_name(openclip_module: str) -> str:
    """An open_clip text module path (`transformer.resblocks.3.mlp.c_fc`) in transformers' spelling, less
    `text_model.` (`encoder.layers.3.mlp.fc1`): CLIP_TO_OPENCLIP undone in reverse order. The fused
    `attn.in_proj` has no single counterpart; its q/k/v names are the caller's to make."""
    name = openclip_module + "."
    for old, new in reversed(CLIP_TO_OPENCLIP):
        name = name.replace(new, old)
    return name[:-1]

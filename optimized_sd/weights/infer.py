"""Model configuration read off a single file's tensor shapes, so any SD 1.x-shaped file (full size or
tiny) builds the right modules without a YAML file. Head counts are not visible in shapes: SD 1.x fixes
8 UNet heads and 64-wide CLIP heads, and `--config` overrides both. (Diffusers folders state theirs in
config.json: see `diffusers_folder.folder_model_config`.)"""

from __future__ import annotations

import re
from collections.abc import Mapping

from optimized_sd.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from optimized_sd.errors import CheckpointError
from optimized_sd.weights.family import CLIP_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

Shapes = Mapping[str, tuple[int, ...]]


def indices(shapes: Shapes, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern`'s first group over all keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := regex.match(key))})


def infer_unet(shapes: Shapes, prefix: str = UNET_PREFIX) -> UNetConfig:
    """UNet hyper-parameters from `input_blocks`/`output_blocks` structure and widths."""
    first = shapes[prefix + "input_blocks.0.0.weight"]
    model_channels, in_channels = first[0], first[1]
    blocks = indices(shapes, re.escape(prefix) + r"input_blocks\.(\d+)\.")
    downsamplers = [b for b in blocks if prefix + f"input_blocks.{b}.0.op.weight" in shapes]
    levels = len(downsamplers) + 1
    num_res_blocks = (len(blocks) - 1 - len(downsamplers)) // levels
    channel_mult, attention_resolutions = [], []
    for level in range(levels):
        block = 1 + level * (num_res_blocks + 1)
        width = shapes[prefix + f"input_blocks.{block}.0.out_layers.3.weight"][0]
        channel_mult.append(width // model_channels)
        if prefix + f"input_blocks.{block}.1.proj_in.weight" in shapes:
            attention_resolutions.append(2**level)
    depth_keys = indices(shapes, re.escape(prefix) + r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    context = shapes[prefix + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
    return UNetConfig(
        in_channels=in_channels,
        out_channels=shapes[prefix + "out.2.weight"][0],
        model_channels=model_channels,
        attention_resolutions=tuple(sorted(attention_resolutions, reverse=True)),
        num_res_blocks=num_res_blocks,
        channel_mult=tuple(channel_mult),
        num_heads=8,
        transformer_depth=len(depth_keys),
        context_dim=context,
    )


def infer_vae(shapes: Shapes, prefix: str = VAE_PREFIX) -> VAEConfig:
    """VAE widths from the encoder's levels; latent widths from the (post-)quant convs."""
    ch = shapes[prefix + "encoder.conv_in.weight"][0]
    levels = indices(shapes, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    res_blocks = indices(shapes, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = tuple(shapes[prefix + f"encoder.down.{level}.block.0.conv1.weight"][0] // ch for level in levels)
    return VAEConfig(
        in_channels=shapes[prefix + "encoder.conv_in.weight"][1],
        out_channels=shapes[prefix + "decoder.conv_out.weight"][0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=len(res_blocks),
        z_channels=shapes[prefix + "decoder.conv_in.weight"][1],
        embed_dim=shapes[prefix + "post_quant_conv.weight"][1],
    )


def infer_text(shapes: Shapes, inner: str = CLIP_TEXT_PREFIX) -> TextEncoderConfig:
    """CLIP text widths (keys in `family.canonical_key` form); heads are hidden/64 as in every CLIP
    text tower SD uses."""
    vocab, hidden = shapes[inner + "embeddings.token_embedding.weight"]
    layers = indices(shapes, re.escape(inner) + r"encoder\.layers\.(\d+)\.")
    return TextEncoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes[inner + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=shapes[inner + "embeddings.position_embedding.weight"][0],
    )


def infer_config(shapes: Shapes) -> ModelConfig:
    """The whole model's config from an LDM-layout key -> shape map."""
    try:
        return ModelConfig(unet=infer_unet(shapes), vae=infer_vae(shapes), text=infer_text(shapes))
    except (KeyError, IndexError, ZeroDivisionError) as error:
        raise CheckpointError(f"cannot read the model's layout from its tensors (missing {error}); pass --config") from None

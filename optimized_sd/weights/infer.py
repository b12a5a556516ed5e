"""Model configuration read off a single file's tensor shapes, so any SD 1.x, SD 2.x or SDXL file (full size
or tiny) builds the right modules without a YAML file. Head counts are not visible in shapes; each family's
rule gives them (SD 1.x: 8 UNet heads; SD 2.x and SDXL: 64-wide UNet heads; every CLIP/OpenCLIP text tower:
64-wide heads), and `--config` overrides them. (Diffusers folders state theirs in config.json: see
`diffusers_folder.folder_model_config`.)"""

from __future__ import annotations

import re
from collections.abc import Mapping

from optimized_sd.config import (
    ModelConfig,
    OpenCLIPConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from optimized_sd.errors import CheckpointFieldError
from optimized_sd.families import registry
from optimized_sd.families.registry import FamilyRecord
from optimized_sd.weights.family import (
    CLIP_TEXT_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    check_label_width,
    detect_family,
)

HEAD_CHANNELS = 64  # SD 2.x / SDXL UNet heads and every CLIP text tower's heads are 64 wide
SDXL_SCALE_FACTOR = 0.13025  # SDXL's VAE latents are scaled by 0.13025, not SD 1.x/2.x's 0.18215 (its record's latent format)

Shapes = Mapping[str, tuple[int, ...]]


def indices(shapes: Shapes, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern`'s first group over all keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := regex.match(key))})


def infer_unet(shapes: Shapes, prefix: str = UNET_PREFIX, heads: int | None = 8) -> UNetConfig:
    """UNet hyper-parameters from `input_blocks`/`output_blocks` structure and widths; heads by the family's rule
    (`heads`: a fixed count, or None: one per 64 channels)."""
    first = shapes[prefix + "input_blocks.0.0.weight"]
    model_channels, in_channels = first[0], first[1]
    blocks = indices(shapes, re.escape(prefix) + r"input_blocks\.(\d+)\.")
    downsamplers = [b for b in blocks if prefix + f"input_blocks.{b}.0.op.weight" in shapes]
    levels = len(downsamplers) + 1
    num_res_blocks = (len(blocks) - 1 - len(downsamplers)) // levels
    channel_mult, attention_resolutions, depths = [], [], []
    for level in range(levels):
        block = 1 + level * (num_res_blocks + 1)
        width = shapes[prefix + f"input_blocks.{block}.0.out_layers.3.weight"][0]
        channel_mult.append(width // model_channels)
        layers = indices(shapes, re.escape(prefix) + rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\.")
        depths.append(len(layers))
        if layers:
            attention_resolutions.append(2**level)
    middle = len(indices(shapes, re.escape(prefix) + r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    attended = {d for d in depths if d}
    uniform = len(attended) == 1 and middle in attended
    context = shapes[prefix + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
    label = shapes.get(prefix + "label_emb.0.0.weight")
    return UNetConfig(
        in_channels=in_channels,
        out_channels=shapes[prefix + "out.2.weight"][0],
        model_channels=model_channels,
        attention_resolutions=tuple(sorted(attention_resolutions, reverse=True)),
        num_res_blocks=num_res_blocks,
        channel_mult=tuple(channel_mult),
        num_heads=heads if heads is not None else -1,
        transformer_depth=attended.pop() if uniform else tuple(depths),
        transformer_depth_middle=None if uniform else middle,
        context_dim=context,
        num_head_channels=-1 if heads is not None else HEAD_CHANNELS,
        use_linear_in_transformer=len(shapes[prefix + "middle_block.1.proj_in.weight"]) == 2,
        adm_in_channels=label[1] if label else None,
    )


def infer_vae(shapes: Shapes, prefix: str = VAE_PREFIX) -> VAEConfig:
    """VAE widths from the encoder's levels; latent widths from the (post-)quant convs, or the decoder's
    input where there are none (Flux's VAE)."""
    ch = shapes[prefix + "encoder.conv_in.weight"][0]
    levels = indices(shapes, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    res_blocks = indices(shapes, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = tuple(shapes[prefix + f"encoder.down.{level}.block.0.conv1.weight"][0] // ch for level in levels)
    z_channels, quant = shapes[prefix + "decoder.conv_in.weight"][1], prefix + "post_quant_conv.weight"
    return VAEConfig(
        in_channels=shapes[prefix + "encoder.conv_in.weight"][1],
        out_channels=shapes[prefix + "decoder.conv_out.weight"][0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=len(res_blocks),
        z_channels=z_channels,
        embed_dim=shapes[quant][1] if quant in shapes else z_channels,
        use_quant_conv=quant in shapes,
    )


def infer_text(shapes: Shapes, inner: str = CLIP_TEXT_PREFIX, penultimate: bool = False) -> TextEncoderConfig:
    """CLIP text widths (keys in `family.canonical_key` form); heads are hidden/64 as in every CLIP
    text tower SD uses."""
    vocab, hidden = shapes[inner + "embeddings.token_embedding.weight"]
    layers = indices(shapes, re.escape(inner) + r"encoder\.layers\.(\d+)\.")
    return TextEncoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes[inner + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // HEAD_CHANNELS),
        max_position_embeddings=shapes[inner + "embeddings.position_embedding.weight"][0],
        penultimate=penultimate,
    )


def text_projection_key(shapes: Shapes, prefix: str) -> str | None:
    """OpenCLIP's `text_projection` (width, proj), or the Linear form `text_projection.weight` (proj, width)
    that diffusers' SDXL conversion script writes; None when the file has neither."""
    for key in (prefix + "text_projection", prefix + "text_projection.weight"):
        if key in shapes:
            return key
    return None


def whole_openclip_tower(shapes: Shapes, prefix: str) -> bool:
    """Does the file hold the whole OpenCLIP tower (real SD 2.x files: all 24 blocks and `text_projection`),
    rather than the 23 blocks diffusers keeps and its conversion script writes back (no projection)?"""
    return text_projection_key(shapes, prefix) is not None


def infer_open_clip(shapes: Shapes, prefix: str, penultimate: bool) -> OpenCLIPConfig:
    """OpenCLIP text tower widths and how the family runs it.

    SD 2.x (`penultimate` False) takes the penultimate block's output then the final norm: a real file's last
    block is never built (a known extra); a file converted from diffusers already lacks it, and all its blocks
    run. SDXL (`penultimate`) keeps every block (the pooled vector needs the last) and takes the context
    before the last."""
    vocab, width = shapes[prefix + "token_embedding.weight"]
    blocks = len(indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    projection = text_projection_key(shapes, prefix)
    is_sd2 = not penultimate
    if is_sd2 and whole_openclip_tower(shapes, prefix):
        blocks -= 1
    projection_dim = None
    if projection is not None and not is_sd2:
        projection_shape = shapes[projection]
        projection_dim = projection_shape[1] if projection.endswith("text_projection") else projection_shape[0]
    return OpenCLIPConfig(
        vocab_size=vocab,
        width=width,
        heads=max(1, width // HEAD_CHANNELS),
        layers=blocks,
        intermediate_size=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        context_length=shapes[prefix + "positional_embedding"][0],
        penultimate=not is_sd2,
        projection_dim=projection_dim,
    )


def infer_config(shapes: Shapes, family: str | None = None) -> ModelConfig:
    """The whole model's config from an LDM/SGM-layout key -> shape map, as its family's record reads it."""
    record = registry.by_name(family or detect_family(shapes))
    return record.infer_config(shapes, record)


def infer_from_towers(shapes: Shapes, record: FamilyRecord) -> ModelConfig:
    """A UNet + VAE + text towers model (every SD family): the UNet and VAE from their shapes, each of the
    record's towers from its prefix, the latent scale from its latent format."""
    text, open_clip = None, None
    try:
        unet, vae = infer_unet(shapes, heads=record.unet_heads), infer_vae(shapes)
        for tower in record.towers:
            if tower.kind == "clip":
                text = infer_text(shapes, tower.prefix + "text_model.", penultimate=tower.penultimate)
            else:
                open_clip = infer_open_clip(shapes, tower.prefix, tower.penultimate)
    except (KeyError, IndexError, ZeroDivisionError) as error:
        raise CheckpointFieldError.about(
            "config", f"is needed: cannot read the model's layout from its tensors (missing {error})"
        ) from None
    check_label_width(record.name, unet.adm_in_channels, open_clip.projection_dim if open_clip is not None else None)
    return ModelConfig(
        unet=unet, vae=vae, text=text, open_clip=open_clip, scale_factor=record.latent.scale_factor, family=record.family_id
    )


def unused_keys(shapes: Shapes, config: ModelConfig) -> dict[str, str]:
    """Key prefixes a family's file carries but never runs -> why (reported as known extras, not errors)."""
    found = registry.find(config.family)
    record = registry.record_for(config) if found is not None else None
    return record.unused_keys(shapes, config) if record is not None and record.unused_keys is not None else {}


def unrun_openclip_layer(shapes: Shapes, config: ModelConfig) -> dict[str, str]:
    """The 24th OpenCLIP block and the projection of a real SD 2.x file (SD 2.x runs 23 blocks)."""
    if not whole_openclip_tower(shapes, OPENCLIP_PREFIX) or config.open_clip is None:
        return {}
    projection = text_projection_key(shapes, OPENCLIP_PREFIX)
    assert projection is not None
    reason = "unused last text layer"
    return {OPENCLIP_PREFIX + f"transformer.resblocks.{config.open_clip.layers}.": reason, projection: reason}

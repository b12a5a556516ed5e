"""How an SD model splits into offload groups for each memory mode, and what each group weighs.
The only place that knows both the memory engine's vocabulary and the model's module names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from optimized_sd.memory.modes import MemoryMode
from optimized_sd.memory.offload import GroupSpec
from optimized_sd.memory.planner import ModelFootprint

if TYPE_CHECKING:
    from optimized_sd.pipelines.weight_storage import WeightStorage

UNET = "model.diffusion_model"
TEXT_GROUP = GroupSpec("text_encoder", ("cond_stage_model",))
VAE_ENCODER = ("first_stage_model.encoder", "first_stage_model.quant_conv")
VAE_DECODER = ("first_stage_model.post_quant_conv", "first_stage_model.decoder")


def unet_blocks(model: nn.Module) -> list[str]:
    """The UNet's top-level modules in the order a forward pass runs them."""
    return [f"{UNET}.{name}" for name in model.get_submodule(UNET).block_names()]


def unet_halves(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """optimizedSD's split: time embedding, input blocks and middle block; then output blocks and out."""
    blocks = unet_blocks(model)
    cut = blocks.index(f"{UNET}.middle_block") + 1
    return tuple(blocks[:cut]), tuple(blocks[cut:])


def group_specs(row: MemoryMode, model: nn.Module) -> list[GroupSpec]:
    """Offload groups for a mode's row (`memory.modes.MODE_TABLE`): its resident rule and denoiser
    grouping mapped to this model's module paths."""
    if row.resident == "everything":
        return [GroupSpec("all", ("model", "first_stage_model", "cond_stage_model"), "never")]
    stage_groups = [TEXT_GROUP, GroupSpec("vae_encoder", VAE_ENCODER), GroupSpec("vae_decoder", VAE_DECODER)]
    release = row.denoiser_release
    if row.denoiser == "whole":
        return stage_groups + [GroupSpec("unet", (UNET,), release)]
    if row.denoiser == "halves":
        first, second = unet_halves(model)
        return stage_groups + [GroupSpec("unet_half_1", first, release), GroupSpec("unet_half_2", second, release)]
    names = model.get_submodule(UNET).block_names()
    return stage_groups + [
        GroupSpec(f"unet.{name}", (f"{UNET}.{name}",), release, prefetch_next=f"unet.{names[(i + 1) % len(names)]}")
        for i, name in enumerate(names)
    ]


def parameter_bytes(model: nn.Module, paths: tuple[str, ...] | list[str], dtype_bytes: int, storage: WeightStorage | None = None) -> int:
    """Weight bytes under `paths` as placed: the compute dtype's `dtype_bytes`, or `storage`'s stored form."""
    if storage is None or not storage.stored:
        return sum(p.numel() for path in paths for p in model.get_submodule(path).parameters()) * dtype_bytes
    return sum(
        storage.placed_bytes(f"{path}.{name}", p, dtype_bytes)
        for path in paths
        for name, p in model.get_submodule(path).named_parameters()
    )


def footprint(model: nn.Module, dtype_bytes: int, storage: WeightStorage | None = None) -> ModelFootprint:
    """Weight bytes of each group as placed (works on a model built on the meta device)."""
    first, second = unet_halves(model)

    def size(paths: tuple[str, ...] | list[str]) -> int:
        return parameter_bytes(model, paths, dtype_bytes, storage)

    return ModelFootprint(
        text_encoder=size(TEXT_GROUP.modules),
        unet=size([UNET]),
        unet_halves=(size(first), size(second)),
        unet_blocks=tuple(size([block]) for block in unet_blocks(model)),
        vae_encoder=size(VAE_ENCODER),
        vae_decoder=size(VAE_DECODER),
    )

"""How a model splits into offload groups for each memory mode, and what each group weighs.
The only place that knows both the memory engine's vocabulary and the model's module names; the names
(denoiser, VAE halves, text root) are its family record's `units`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from optimized_sd.families import registry
from optimized_sd.families.registry import Units
from optimized_sd.memory.modes import MemoryMode
from optimized_sd.memory.offload import GroupSpec
from optimized_sd.memory.planner import ModelFootprint

if TYPE_CHECKING:
    from optimized_sd.pipelines.weight_storage import WeightStorage

# Every SD family's units (the defaults of `families.registry.Units`); a model's own come from its record.
UNET = Units().denoiser
VAE_ENCODER = Units().vae_encoder
VAE_DECODER = Units().vae_decoder
# `stream` splits a UNet block above this many parameters (100 MB in fp16) into the parts it runs one
# after another: SDXL's 10-layer transformer blocks (~750 MB) stream layer by layer.
STREAM_UNIT_PARAMS = 50_000_000


def model_record(model: nn.Module) -> registry.FamilyRecord | None:
    """The family record of a model built from a config (None for a bare module or an unknown family)."""
    config = getattr(model, "config", None)
    return registry.record_for(config) if config is not None and registry.find(config.family) is not None else None


def units(model: nn.Module) -> Units:
    """The module paths the engine moves for this model, from its family record (a bare module: SD's)."""
    record = model_record(model)
    return record.units if record is not None else Units()


def text_root(model: nn.Module) -> str:
    """The text conditioning's module path: `cond_stage_model` (SD 1.x/2.x) or `conditioner` (SDXL)."""
    return getattr(model, "text_root", units(model).text_root)


def text_towers(model: nn.Module) -> tuple[str, ...]:
    """The text towers' module paths in the order the text step runs them (SDXL: CLIP ViT-L, then bigG)."""
    root = text_root(model)
    towers = getattr(model.get_submodule(root), "towers", None)
    return tuple(f"{root}.{tower}" for tower in towers()) if towers is not None else (root,)


def text_group(model: nn.Module) -> GroupSpec:
    """The whole text conditioning as one group, entered at its first tower's call (the text step runs
    each tower itself, never the conditioner's own forward)."""
    return GroupSpec("text_encoder", text_towers(model))


def text_groups(model: nn.Module, streamed: bool) -> list[GroupSpec]:
    """The text stage's groups: the whole text module at once, or (`streamed`) each tower layer by layer:
    a tower's own tensors (position embeddings, OpenCLIP's projection) stay for the stage, its parts
    (`stream_parts`: token embedding, each layer, final norm) load one at a time as they run, the token
    embedding as the rows its ids look up (`GroupSpec.rows`)."""
    if not streamed:
        return [text_group(model)]
    groups, parts = [], []
    for path in text_towers(model):
        module = model.get_submodule(path)
        groups.append(GroupSpec(f"text.{path}", (path,), "stage_end"))
        parts += [f"{path}.{part}" for part in module.stream_parts()]
    names = [f"text.{part}" for part in parts]
    streamed_groups = [
        GroupSpec(
            name,
            (part,),
            "after_forward",
            prefetch_next=names[i + 1] if i + 1 < len(names) else None,
            rows=isinstance(model.get_submodule(part), nn.Embedding),
        )
        for i, (name, part) in enumerate(zip(names, parts))
    ]
    return groups + streamed_groups


def unet_blocks(model: nn.Module) -> list[str]:
    """The UNet's top-level modules in the order a forward pass runs them."""
    denoiser = units(model).denoiser
    return [f"{denoiser}.{name}" for name in model.get_submodule(denoiser).block_names()]


def split_unit(model: nn.Module, path: str, limit: int) -> list[tuple[str, ...]]:
    """`path` as one streamed unit, or, when it holds more than `limit` parameters and says how it runs
    (`stream_parts`: its children in call order, grouped), as its parts, each split again as needed."""
    module = model.get_submodule(path)
    parts = getattr(module, "stream_parts", None)
    if parts is None or sum(p.numel() for p in module.parameters()) <= limit:
        return [(path,)]
    units: list[tuple[str, ...]] = []
    for part in parts():
        if len(part) == 1:
            units += split_unit(model, f"{path}.{part[0]}", limit)
        else:
            units.append(tuple(f"{path}.{name}" for name in part))
    return units


def stream_units(model: nn.Module, limit: int | None = None) -> list[tuple[str, ...]]:
    """The UNet's streamed units in the order a forward pass runs them: its top-level blocks, the large
    ones split (see `split_unit`); or the units its record's `denoiser_units` gives (a DiT). Each unit's
    modules run first to last, as the engine's hooks expect."""
    paths = units(model)
    if paths.denoiser_units is not None:
        denoiser = model.get_submodule(paths.denoiser)
        return [tuple(f"{paths.denoiser}.{name}" for name in unit) for unit in paths.denoiser_units(denoiser)]
    limit = STREAM_UNIT_PARAMS if limit is None else limit
    return [unit for block in unet_blocks(model) for unit in split_unit(model, block, limit)]


def unet_halves(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """optimizedSD's split: time embedding, input blocks and middle block; then output blocks and out. A
    denoiser given as units (a DiT) splits after the unit that ends its first half of the weights."""
    paths = units(model)
    if paths.denoiser_units is not None:
        listed = stream_units(model)
        sizes = [sum(p.numel() for path in unit for p in model.get_submodule(path).parameters()) for unit in listed]
        total, running, cut = sum(sizes), 0, len(listed) - 1
        for index, size in enumerate(sizes):
            running += size
            if running * 2 >= total:
                cut = index + 1
                break
        cut = min(max(cut, paths.hoisted_units(model.get_submodule(paths.denoiser)) + 1), len(listed) - 1)
        return tuple(p for unit in listed[:cut] for p in unit), tuple(p for unit in listed[cut:] for p in unit)
    blocks = unet_blocks(model)
    cut = blocks.index(f"{paths.denoiser}.middle_block") + 1
    return tuple(blocks[:cut]), tuple(blocks[cut:])


def group_specs(row: MemoryMode, model: nn.Module, unit_params: int | None = None) -> list[GroupSpec]:
    """Offload groups for a mode's row (`memory.modes.MODE_TABLE`): its resident rule and denoiser
    grouping mapped to this model's module paths. A denoiser streamed in blocks streams the text towers
    by layer too, and splits blocks above `unit_params` parameters into their parts (`stream_units`)."""
    paths = units(model)
    if row.resident == "everything":
        return [GroupSpec("all", ("model", "first_stage_model", text_root(model)), "never")]
    streamed = row.denoiser == "blocks"
    stage_groups = [*text_groups(model, streamed), GroupSpec("vae_encoder", paths.vae_encoder), GroupSpec("vae_decoder", paths.vae_decoder)]
    release = row.denoiser_release
    if row.denoiser == "whole":
        # a denoiser given as units is entered by its first unit's first module (a DiT's hoisted embedders are
        # called before its forward), not by its own forward
        whole = tuple(path for unit in stream_units(model) for path in unit) if paths.denoiser_units else (paths.denoiser,)
        return stage_groups + [GroupSpec("unet", whole, release)]
    if row.denoiser == "halves":
        first, second = unet_halves(model)
        return stage_groups + [GroupSpec("unet_half_1", first, release), GroupSpec("unet_half_2", second, release)]
    streamed_units = stream_units(model, unit_params)
    names = [f"unet.{unit[0][len(paths.denoiser) + 1 :]}" for unit in streamed_units]
    # after the last unit the next step starts again; units hoisted out of the steps are not fetched for it
    hoisted = paths.hoisted_units(model.get_submodule(paths.denoiser)) if paths.denoiser_units else 0
    following = [*names[1:], names[min(hoisted, len(names) - 1)]]
    return stage_groups + [
        GroupSpec(name, unit, release, prefetch_next=after) for name, unit, after in zip(names, streamed_units, following)
    ]


def host_part(group: str) -> str:
    """The RAM planner's component (`MemorySession.host_parts`) that an offload group of `group_specs` belongs to."""
    if group.startswith("text"):
        return "text_encoder"
    if group.startswith("unet"):
        return "denoiser"
    return group


def parameter_bytes(model: nn.Module, paths: tuple[str, ...] | list[str], dtype_bytes: int, storage: WeightStorage | None = None) -> int:
    """Weight bytes under `paths` as placed: the compute dtype's `dtype_bytes`, or `storage`'s stored form."""
    if storage is None or not storage.held:
        return sum(p.numel() for path in paths for p in model.get_submodule(path).parameters()) * dtype_bytes
    return sum(
        storage.placed_bytes(f"{path}.{name}", p, dtype_bytes)
        for path in paths
        for name, p in model.get_submodule(path).named_parameters()
    )


def footprint(model: nn.Module, dtype_bytes: int, storage: WeightStorage | None = None) -> ModelFootprint:
    """Weight bytes of each group as placed (works on a model built on the meta device)."""
    first, second = unet_halves(model)
    paths = units(model)

    def size(paths: tuple[str, ...] | list[str]) -> int:
        return parameter_bytes(model, paths, dtype_bytes, storage)

    record = model_record(model)
    return ModelFootprint(
        text_encoder=size(text_group(model).modules),
        unet=size([paths.denoiser]),
        unet_halves=(size(first), size(second)),
        unet_blocks=tuple(size(unit) for unit in stream_units(model)),
        vae_encoder=size(paths.vae_encoder),
        vae_decoder=size(paths.vae_decoder),
        **({} if record is None else dict(
            family=record.family_id, activations=record.unet_activations, latent_downscale=record.latent.downscale
        )),
    )

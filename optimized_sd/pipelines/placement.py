"""How a model splits into named components (its text towers, VAE and denoiser; a ControlNet; a refiner), how
each component splits into offload groups for each memory mode, and what each weighs. The only place that knows
both the memory engine's vocabulary and the model's module names; the names (denoiser, VAE halves, text root)
are its family record's `units`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from optimized_sd.families import registry
from optimized_sd.families.registry import Units
from optimized_sd.memory.modes import MemoryMode
from optimized_sd.memory.offload import GroupSpec, OffloadEngine
from optimized_sd.memory.planner import (
    ComponentSize,
    DecodeActivations,
    DenoiserActivations,
    EncodeActivations,
    ModelFootprint,
)

if TYPE_CHECKING:
    from optimized_sd.pipelines.memory_session import MemorySession
    from optimized_sd.pipelines.weight_storage import WeightStorage

# Every SD family's units (the defaults of `families.registry.Units`); a model's own come from its record.
UNET = Units().denoiser
VAE_ENCODER = Units().vae_encoder
VAE_DECODER = Units().vae_decoder
# `stream` splits a UNet block above this many parameters (100 MB in fp16) into the parts it runs one
# after another: SDXL's 10-layer transformer blocks (~750 MB) stream layer by layer.
STREAM_UNIT_PARAMS = 50_000_000
# A loaded model's components, by the names `pipe.memory.components` gives them.
TEXT, VAE, DENOISER = "text", "vae", "denoiser"


@dataclass
class Component:
    """A named network the memory session places: `specs` maps a plan's mode row to its offload groups (module
    paths under `model`), `sizes` holds what the planner weighs of it, by name (`planner.ComponentSize`: its weights
    as placed, per part resident in its own stages, a VAE's halves apart). The
    components of one tree (a checkpoint's text towers, VAE and denoiser) share that tree's engine, so one
    residency log covers them; a component with a tree of its own (a ControlNet) gets an engine of its own, by the
    same plan; one with a `session` of its own (an SDXL refiner: a whole second model) is planned by that session,
    beside this one. A new family's extra tower is one more entry: its name, its groups per row, its sizes; the
    planner needs no field for it."""

    name: str
    model: nn.Module
    source: object  # optimized_sd.weights.sources.TensorSource
    specs: Callable[[MemoryMode], list[GroupSpec]]
    sizes: Mapping[str, ComponentSize] = field(default_factory=dict)
    session: MemorySession | None = None
    engine: OffloadEngine | None = None  # its tree's engine while placed
    placed: tuple[str, str] | None = None  # (mode, host storage) its own engine was built for
    released: list[str] = field(default_factory=list)  # this call's early releases ("released after step N")

    def close(self) -> None:
        """Let go of an engine of its own (a shared tree's engine is its session's to close)."""
        if self.engine is not None and self.placed is not None:
            self.engine.close()
        self.engine, self.placed = None, None


def combined_sizes(components: Iterable[Component]) -> dict[str, int]:
    """The weight bytes of `components` together, by the planner's names for them (a report's figures)."""
    total: dict[str, int] = {}
    for component in components:
        for key, size in component.sizes.items():
            total[key] = total.get(key, 0) + size.weights
    return total


def planned_sizes(components: Iterable[Component]) -> list[ComponentSize]:
    """What the planner weighs of `components`, in their order."""
    return [size for component in components for size in component.sizes.values()]


def tree_groups(row: MemoryMode, groups: list[list[GroupSpec]]) -> list[GroupSpec]:
    """One tree's offload groups from its components' (`groups`, in component order): where the row keeps
    everything resident, the tree is one group placed in one load (`all`), else their groups side by side."""
    flat = [spec for specs in groups for spec in specs]
    if row.resident == "everything" and len(flat) > 1:
        return [GroupSpec("all", tuple(path for spec in flat for path in spec.modules), "never")]
    return flat


def context_projections_apart(model: nn.Module, specs: list[GroupSpec]) -> list[GroupSpec]:
    """`specs` and, inside each streamed group, every cross-attention's key and value projections as a group
    of their own, read only when called (`GroupSpec.on_demand`). Where the sampling stage keeps the context's
    projections (`runtime.ContextProjections`, on the CPU) they run at the first step only, so later steps
    read and cast none of their weights: 13% of SDXL's UNet, 2% of SD 1.5's."""
    apart = []
    for spec in specs:
        if spec.release != "after_forward" or spec.rows or spec.on_demand:
            continue
        for path in spec.modules:
            for name, module in model.get_submodule(path).named_modules(prefix=path):
                if getattr(module, "projects_context", False):
                    apart.append(GroupSpec(f"{spec.name}:{name}", (f"{name}.to_k", f"{name}.to_v"), "after_forward", on_demand=True))
    return specs + apart


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


def top_module(path: str) -> str:
    """The top-level module holding `path` (what `everything` places whole)."""
    return path.split(".")[0]


def text_specs(row: MemoryMode, model: nn.Module) -> list[GroupSpec]:
    """The text component's groups: its root whole when everything stays resident; the towers for their stage,
    by layer where the denoiser streams by blocks (`text_groups`)."""
    if row.resident == "everything":
        return [GroupSpec(TEXT, (text_root(model),), "never")]
    return text_groups(model, row.denoiser == "blocks")


def vae_specs(row: MemoryMode, model: nn.Module) -> list[GroupSpec]:
    """The VAE's groups: whole when everything stays resident, else each half for its stage."""
    paths = units(model)
    if row.resident == "everything":
        return [GroupSpec(VAE, (top_module(paths.vae_encoder[0]),), "never")]
    return [GroupSpec("vae_encoder", paths.vae_encoder), GroupSpec("vae_decoder", paths.vae_decoder)]


def denoiser_specs(row: MemoryMode, model: nn.Module, unit_params: int | None = None) -> list[GroupSpec]:
    """The denoiser's groups for the row's grouping: whole, halves or streamed units (blocks split above
    `unit_params` parameters, see `stream_units`), each released as the row says."""
    paths = units(model)
    if row.resident == "everything":
        return [GroupSpec(DENOISER, (top_module(paths.denoiser),), "never")]
    release = row.denoiser_release
    if row.denoiser == "whole":
        # a denoiser given as units is entered by its first unit's first module (a DiT's hoisted embedders are
        # called before its forward), not by its own forward
        whole = tuple(path for unit in stream_units(model) for path in unit) if paths.denoiser_units else (paths.denoiser,)
        return [GroupSpec("unet", whole, release)]
    if row.denoiser == "halves":
        first, second = unet_halves(model)
        return [GroupSpec("unet_half_1", first, release), GroupSpec("unet_half_2", second, release)]
    streamed_units = stream_units(model, unit_params)
    names = [f"unet.{unit[0][len(paths.denoiser) + 1 :]}" for unit in streamed_units]
    # after the last unit the next step starts again; units hoisted out of the steps are not fetched for it
    hoisted = paths.hoisted_units(model.get_submodule(paths.denoiser)) if paths.denoiser_units else 0
    following = [*names[1:], names[min(hoisted, len(names) - 1)]]
    return [GroupSpec(name, unit, release, prefetch_next=after) for name, unit, after in zip(names, streamed_units, following)]


def group_specs(row: MemoryMode, model: nn.Module, unit_params: int | None = None) -> list[GroupSpec]:
    """The model tree's offload groups for a mode's row (`memory.modes.MODE_TABLE`): its components' groups
    (`tree_groups`), the denoiser's blocks split above `unit_params` parameters."""
    return tree_groups(row, [denoiser_specs(row, model, unit_params), vae_specs(row, model), text_specs(row, model)])


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


def denoiser_activations(model: nn.Module) -> DenoiserActivations:
    """The denoiser's activation model from the family record's constants (a bare module: SD 1.x's)."""
    record = model_record(model)
    if record is None:
        return DenoiserActivations()
    return DenoiserActivations(record.family_id, record.unet_activations, record.latent.downscale)


def component_sizes(model: nn.Module, dtype_bytes: int, storage: WeightStorage | None = None) -> dict[str, dict[str, ComponentSize]]:
    """What the planner weighs of each of the model's components, by component name (bytes as placed): the
    denoiser in the sampling stage, streamed by units (copied ahead); the VAE's halves in the encode and decode
    stages; the text towers in the text stage."""
    first, second = unet_halves(model)
    paths = units(model)

    def size(paths: tuple[str, ...] | list[str]) -> int:
        return parameter_bytes(model, paths, dtype_bytes, storage)

    denoiser = ComponentSize(
        "denoiser", size([paths.denoiser]), ("denoise",), tuple(size(unit) for unit in stream_units(model)),
        (size(first), size(second)), prefetched=True, activations=denoiser_activations(model),
    )  # fmt: skip
    return {
        DENOISER: {"denoiser": denoiser},
        VAE: {
            "vae_encoder": ComponentSize("vae_encoder", size(paths.vae_encoder), ("encode",), activations=EncodeActivations()),
            "vae_decoder": ComponentSize("vae_decoder", size(paths.vae_decoder), ("decode",), activations=DecodeActivations()),
        },
        TEXT: {"text_encoder": ComponentSize("text_encoder", size(text_group(model).modules), ("text",))},
    }


def model_components(model: nn.Module, source, dtype_bytes: int, storage: WeightStorage | None = None) -> list[Component]:
    """A loaded model as the memory session's components, on its one tree: the denoiser, the VAE, the text
    towers (in the order `group_specs` lists their groups)."""
    sizes = component_sizes(model, dtype_bytes, storage)
    specs: dict[str, Callable[[MemoryMode, nn.Module], list[GroupSpec]]] = {DENOISER: denoiser_specs, VAE: vae_specs, TEXT: text_specs}
    return [
        Component(name, model, source, lambda row, groups=groups: groups(row, model), sizes[name]) for name, groups in specs.items()
    ]


def footprint(model: nn.Module, dtype_bytes: int, storage: WeightStorage | None = None) -> ModelFootprint:
    """Weight bytes of each component as placed, as the SD-shaped view (works on a model built on the meta device)."""
    return ModelFootprint.of(planned_sizes(model_components(model, None, dtype_bytes, storage)))

"""Flux.1 dev and schnell (Black Forest Labs 2024) as family records: a rectified-flow transformer over 2x2-packed
16-channel latents, conditioned on T5-XXL states and CLIP-L's pooled vector, dev also on a distilled guidance value.

Its files are not one LDM checkpoint: the transformer (BFL `flux1-dev.safetensors`, ComfyUI's all-in-one, or a
diffusers folder), `ae.safetensors` and the two text towers may each be a file of their own, so the record brings
a `Loader` that opens them (`weights.flux_loading`) into one module tree with the memory engine's names:
`model.diffusion_model` (the transformer), `first_stage_model` (the VAE), `text_encoders.clip_l` and
`text_encoders.t5xxl` (ComfyUI's names). The pipeline class is `pipelines.flux.FluxDiffusion`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from torch import nn

from optimized_sd.errors import CheckpointError, FieldError, UserError
from optimized_sd.families.registry import (
    Defaults,
    FamilyRecord,
    LatentFormat,
    Loader,
    LoraKeys,
    Shapes,
    TextTower,
    Units,
    register,
)
from optimized_sd.memory.planner import TokenActivations
from optimized_sd.models.flux import VAE_SCALE, VAE_SHIFT
from optimized_sd.models.sd import PartsModel
from optimized_sd.sampling.model_sampling import FlowSampling

FLUX_DEV, FLUX_SCHNELL = "flux-dev", "flux-schnell"
TEXT_ROOT = PartsModel.text_root
CLIP_TOWER, T5_TOWER = "clip_l", "t5xxl"
T5_HUB_TOKENIZER = "google/t5-v1_1-xxl"
GUIDANCE_DEFAULT = 3.5  # dev's distilled guidance (diffusers' FluxPipeline and Forge's default)
MAX_SEQUENCE = {FLUX_DEV: 512, FLUX_SCHNELL: 256}  # T5 tokens a prompt is padded to (diffusers' defaults)
# The transformer's activations per image token (the planner's `TokenActivations`), from `benchmarks/calibrate.py
# --flux` on the CPU (fp32, Flux.1's width 3072, one double and one single block, 64 and 256 image tokens beside 64
# text tokens, 2026-12-06): 64,643 elements per joint token, 72,723 per image token at 1024x1024 with 512 T5 tokens;
# plus 10%. The MLP is not run in token chunks (share 1). A CUDA bench run's figures replace it (`calibrate.py`).
FLUX_ACTIVATIONS = TokenActivations(per_token=80_000, chunked_ff_share=1.0)

# Latent channel -> RGB for the transformer's latents (ComfyUI's `latent_formats.Flux` factors), for live previews.
FLUX_LATENT = LatentFormat(
    channels=16,
    scale_factor=VAE_SCALE,
    shift=VAE_SHIFT,
    rgb_factors=(
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
    ),
    rgb_bias=(-0.0329, -0.0718, -0.0851),
)  # fmt: skip


def flow_sampling(record: FamilyRecord) -> FlowSampling:
    """dev: shifted per image by mu from its token count (`at_tokens`); schnell: no shift. Both on Flux's own grid
    linspace(1, 1/N, N) (diffusers' FluxPipeline passes these sigmas) and called with t = sigma (the transformer
    embeds t x 1000 itself)."""
    return FlowSampling(shift=1.0, dynamic=record.name == FLUX_DEV, timestep_scale=1.0, flux_grid=True)


def is_flux_transformer(guidance: bool):
    """A `detect` for a Flux.1 transformer (BFL, ComfyUI or diffusers names), with or without dev's guidance input."""

    def detect(shapes: Shapes) -> bool:
        from optimized_sd.weights.flux_keys import identify_flux

        try:
            info = identify_flux(dict(shapes))
        except CheckpointError:
            return False
        return info.transformer is not None and (info.variant == "dev") == guidance

    return detect


def hoisted_units(transformer: nn.Module) -> list[tuple[str, ...]]:
    """The units run once per sampling run (`precompute_modulation`), in its call order: the t/guidance/text
    embedders, then each block's adaLN linears, a block at a time: together they are 3.2B weights (6.5 GB in
    bf16), which `stream` must not fetch at once."""
    config = transformer.config
    embedders = ("time_in", *(("guidance_in",) if config.guidance_embed else ()), "vector_in")
    return [
        embedders,
        *((f"double_blocks.{i}.img_mod", f"double_blocks.{i}.txt_mod") for i in range(config.depth)),
        *((f"single_blocks.{i}.modulation",) for i in range(config.depth_single_blocks)),
        ("final_layer.adaLN_modulation",),
    ]


def hoisted_count(transformer: nn.Module) -> int:
    return len(hoisted_units(transformer))


def flux_units(transformer: nn.Module) -> list[tuple[str, ...]]:
    """The transformer's streamed units in call order: first the `hoisted_units`, then per step: the input
    projections, each block without its adaLN (first module to last as `forward_modulated` calls them), the
    final norm and projection."""
    config = transformer.config
    double = ("img_norm1", "img_attn", "img_norm2", "img_mlp", "txt_norm1", "txt_attn", "txt_norm2", "txt_mlp")
    single = ("pre_norm", "linear1", "norm", "linear2")
    return [
        *hoisted_units(transformer),
        ("img_in", "txt_in"),
        *(tuple(f"double_blocks.{i}.{name}" for name in double) for i in range(config.depth)),
        *(tuple(f"single_blocks.{i}.{name}" for name in single) for i in range(config.depth_single_blocks)),
        ("final_layer.norm_final", "final_layer.linear"),
    ]


# --- which files ---------------------------------------------------------------------------------------

# The load field that gives each part (its errors name it; each front end says it in its own words).
PART_FIELDS = {"transformer": "checkpoint", "clip_l": "text_encoders", "t5": "text_encoders", "vae": "vae"}
PART_EXAMPLES = {"clip_l": "clip_l.safetensors", "t5": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"}


def claims(path: Path) -> bool:
    """A Flux.1 diffusers folder, or a safetensors or GGUF file holding a Flux.1 transformer or a T5 tower (a T5 file
    given as the checkpoint is claimed so that its error says which flag takes it)."""
    from optimized_sd.weights.flux_keys import identify_flux
    from optimized_sd.weights.gguf import is_gguf_file
    from optimized_sd.weights.loading import is_safetensors_file, open_weight_file

    path = Path(path)
    if path.is_dir():
        return diffusers_flux_transformer(path) is not None
    try:
        if not path.is_file() or not (is_gguf_file(path) or is_safetensors_file(path)):
            return False
        source = open_weight_file(path)
        try:
            info = identify_flux(source.shapes(), str(path))
        finally:
            source.close()
    except (CheckpointError, OSError):
        return False
    return info.transformer is not None or set(info.parts) == {"t5"}


def diffusers_flux_transformer(folder: Path) -> Path | None:
    """The transformer weight file of a diffusers Flux folder (model_index.json names a Flux pipeline), else None."""
    from optimized_sd.weights.diffusers_folder import pipeline_class

    pipeline = pipeline_class(folder)
    if not pipeline.startswith("Flux") or pipeline.startswith("Flux2"):
        return None
    return folder / "transformer"


def folder_files(folder: Path) -> list[list[Path]]:
    """A diffusers Flux folder's weight files, per part: every safetensors file of transformer/, vae/,
    text_encoder/ and text_encoder_2/ (a sharded part is read as one source)."""
    files = []
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        found = sorted((folder / part).glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"diffusers folder part {folder / part} holds no .safetensors file")
        files.append(found)
    return files


def prepare(
    path: Path | str, text_encoders: Iterable[Path | str] = (), vae: Path | str | None = None, parts_from: Path | str | None = None
):
    """Open the Flux.1 files (the checkpoint, `--text-encoder` files, `--vae`, and `--parts-from`: a ComfyUI
    all-in-one whose transformer is not read) into a model on `meta`, checked strictly
    (`weights.loading.LoadedModel`). Each file's parts are told from its keys; a part in the wrong flag or missing
    is a one-line error naming the flag that supplies it."""
    from optimized_sd.config import ModelConfig, UNetConfig
    from optimized_sd.weights.flux_loading import PART_WORDS, PREPARE, open_flux_files

    path = Path(path)
    extra = [Path(p) for p in text_encoders]
    for given in extra:  # before the files are put together, so a transformer here is named as such
        refuse_transformer(given)
    flagged = [*extra, *([Path(vae)] if vae is not None else [])]
    if path.is_dir():
        parts, found = open_sharded(folder_files(path))
        if flagged:
            more, more_found = open_flux_files(flagged)
            parts.update(more)  # the flags replace the folder's own parts
            found.update(more_found)
    else:
        parts, found = open_flux_files([path, *flagged])
    for name, info in found.items():
        given = Path(name)
        if given == path and info.transformer is None:
            held = ", ".join(PART_WORDS[part] for part in info.parts)
            field = PART_FIELDS["vae"] if info.parts == ("vae",) else PART_FIELDS["t5"]
            raise FieldError.about(field, f"takes {given}: it holds a {held}, not a Flux transformer (what the checkpoint must be)")
        if vae is not None and given == Path(vae) and "vae" not in info.parts:
            raise FieldError.about("vae", f"{given} holds no VAE ({', '.join(PART_WORDS[p] for p in info.parts)})")
    if parts_from is not None:
        add_donor_parts(parts, Path(parts_from))
    for part in ("clip_l", "t5", "vae"):
        if part not in parts:
            problem = f"must give Flux.1's {PART_WORDS[part]}, which {path.name} does not hold (e.g. {PART_EXAMPLES[part]})"
            raise FieldError.about(PART_FIELDS[part], problem)
    components = {name: PREPARE[name](source) for name, source in parts.items()}
    transformer = components["transformer"].model
    variant = FLUX_DEV if transformer.config.guidance_embed else FLUX_SCHNELL
    vae_model = components["vae"].model
    config = ModelConfig(
        unet=UNetConfig(in_channels=transformer.config.in_channels, out_channels=transformer.config.out_channels,
                        context_dim=transformer.config.context_in_dim),
        vae=vae_model.config, text=None, scale_factor=VAE_SCALE, family=variant,
    )  # fmt: skip
    towers = {CLIP_TOWER: components["clip_l"].model, T5_TOWER: components["t5"].model}  # CLIP-L's pooled vector, then T5
    model = PartsModel(config, transformer, vae_model, **towers)
    t5_encoder = components["t5"].model.transformer
    t5_encoder.encoder.embed_tokens = t5_encoder.shared  # one module, so a hook on `shared` sees the lookup
    prefixes = {"transformer": "model.diffusion_model.", "vae": "first_stage_model.",
                "clip_l": f"{TEXT_ROOT}.{CLIP_TOWER}.", "t5": f"{TEXT_ROOT}.{T5_TOWER}."}  # fmt: skip
    return loaded_model(model, config, path, components, prefixes)


def loaded_model(model: nn.Module, config, path: Path, components: Mapping, prefixes: Mapping[str, str]):
    """The `LoadedModel` of a model put together from checked components: their tensors as one source under the
    model's names (each component's keys under its module's prefix), their known extras in one report."""
    from optimized_sd.weights.loading import Checkpoint, LoadedModel, LoadReport
    from optimized_sd.weights.sources import ChainSource, RenamedSource

    source = ChainSource(
        RenamedSource(component.source, {prefixes[name] + key: key for key in component.source.keys()})
        for name, component in components.items()
    )
    report = LoadReport()
    for component in components.values():
        report.known_extras.update(component.report.known_extras)
    return LoadedModel(model, config, Checkpoint(source, path), source, report)


def add_donor_parts(parts: dict, path: Path) -> None:
    """`--parts-from`: the parts `parts` lacks from a whole Flux.1 checkpoint, its transformer never read."""
    from optimized_sd.weights.flux_loading import open_flux_files

    if not path.is_file():
        raise FieldError.about("parts_from", f"{path}: no such file")
    donor, _ = open_flux_files([path])
    for part, view in donor.items():
        if part != "transformer":
            parts.setdefault(part, view)  # the flags' own files come first


def refuse_transformer(path: Path) -> None:
    """A `--text-encoder` file holding a Flux transformer is a one-line error saying it is the checkpoint."""
    from optimized_sd.weights.flux_keys import identify_flux
    from optimized_sd.weights.loading import open_weight_file

    if not path.is_file():
        raise FieldError.about("text_encoders", f"{path}: no such file")
    source = open_weight_file(path)
    try:
        if identify_flux(source.shapes(), str(path)).transformer is not None:
            raise FieldError.about("text_encoders", f"{path} holds a Flux transformer; give it as the checkpoint")
    finally:
        source.close()


def open_sharded(groups: list[list[Path]]):
    """`open_flux_files` for a diffusers folder: each part folder's shards read as one source."""
    from optimized_sd.weights.flux_keys import flux_parts, identify_flux
    from optimized_sd.weights.loading import open_weight_file
    from optimized_sd.weights.sources import ChainSource

    parts, found = {}, {}
    for files in groups:
        source = ChainSource(open_weight_file(file) for file in files)
        info = identify_flux(source.shapes(), str(files[0].parent))
        found[str(files[0].parent)] = info
        parts.update(flux_parts(source, info))
    return parts, found


def pipeline(*args, **kwargs):
    from optimized_sd.pipelines.flux import FluxDiffusion

    return FluxDiffusion(*args, **kwargs)


LOADER = Loader(claims=claims, prepare=prepare, pipeline=pipeline, options=("parts_from",))
UNITS = Units(
    vae_encoder=("first_stage_model.encoder",),
    vae_decoder=("first_stage_model.decoder",),
    text_root=TEXT_ROOT,
    denoiser_units=flux_units,
    hoisted=hoisted_count,
)
TOWERS = (
    TextTower("clip", "text_encoders.clip_l.transformer.", "text_encoder", "tokenizer"),
    TextTower("t5", "text_encoders.t5xxl.transformer.", "text_encoder_2", "tokenizer_2", lora_name=None),
)


def fused_lora_names(tables: Callable[[], tuple]) -> Callable[[Shapes], dict[str, tuple]]:
    """A `LoraKeys.denoiser_names` for a BFL-named transformer (Flux.1, Flux.2) from its diffusers tables
    (`tables()` -> top, double-block, single-block names and the final adaLN pair; read when first used)."""

    def names(shapes: Shapes) -> dict[str, tuple]:
        top, double, single, final = tables()
        return lora_module_names(shapes, top, double, single, final)

    return names


def lora_module_names(shapes: Shapes, top, double, single, final) -> dict[str, tuple]:
    """LoRA module name -> `weights.lora.Target`s in the transformer: BFL's own names (kohya's `lora_unet_`,
    ai-toolkit's `diffusion_model.`) and diffusers' (peft's `transformer.`), whose q, k and v (and Flux.1's single
    blocks' proj_mlp) are row ranges of our fused layers, hidden-size rows each, the MLP the rest, and whose final
    adaLN holds its two halves in the other order (the tables of `weights.flux_keys` and `weights.flux2_keys`)."""
    from optimized_sd.weights.infer import indices
    from optimized_sd.weights.lora import Target

    names = {key[: -len(".weight")]: (Target(key),) for key in shapes if key.endswith(".weight")}
    hidden = shapes["img_in.weight"][0]
    tables = [("", "", top)]
    for bfl, diffusers_name, table in (("double_blocks", "transformer_blocks", double),
                                       ("single_blocks", "single_transformer_blocks", single)):  # fmt: skip
        tables += [(f"{bfl}.{i}.", f"{diffusers_name}.{i}.", table) for i in indices(shapes, rf"{bfl}\.(\d+)\.")]
    for bfl_prefix, diffusers_prefix, table in tables:
        for bfl, parts in table:
            key = f"{bfl_prefix}{bfl}.weight"
            if key not in shapes:  # a norm's `.scale`, or schnell's absent guidance embedder
                continue
            if len(parts) == 1:
                names[diffusers_prefix + parts[0]] = (Target(key),)
                continue
            widths = [hidden] * (len(parts) - 1) + [shapes[key][0] - hidden * (len(parts) - 1)]
            for index, (part, width) in enumerate(zip(parts, widths)):
                names[diffusers_prefix + part] = (Target(key, hidden * index, width),)
    key = f"{final[0]}.weight"
    half = shapes[key][0] // 2
    names[final[1]] = (Target(key, half, half, source_row=0), Target(key, 0, half, source_row=half))
    return names


def flux1_tables() -> tuple:
    from optimized_sd.weights.flux_keys import DOUBLE_BLOCK_NAMES, FINAL_ADALN, SINGLE_BLOCK_NAMES, TOP_NAMES

    return TOP_NAMES, DOUBLE_BLOCK_NAMES, SINGLE_BLOCK_NAMES, FINAL_ADALN


# kohya (sd-scripts) names the transformer `lora_unet_` + BFL names, CLIP-L `lora_te1_` and T5 `lora_te3_`; ai-toolkit
# and BFL-style files `diffusion_model.` + BFL names; diffusers/peft `transformer.` and `text_encoder.`.
FLUX_LORA = LoraKeys(
    kohya={"lora_unet_": "unet", "lora_transformer_": "unet", "lora_te1_": "text"},
    diffusers={"transformer.": "unet", "diffusion_model.": "unet", "text_encoder.": "text"},
    denoiser_names=fused_lora_names(flux1_tables),
    telltale=r"(double_blocks|single_blocks|single_transformer_blocks)[._]\d+",
    unsupported={"lora_te3_": "T5-XXL text encoder"},
)


def unsupported_config(shapes: Shapes, record: FamilyRecord):
    raise UserError(f"{record.display_name} is opened by its own loader (families.flux.prepare), not from one LDM checkpoint")


def flux_record(name: str, display_name: str, guidance: bool, steps: int) -> FamilyRecord:
    """A Flux.1 variant's record: dev and schnell differ only in the guidance input and their step count."""
    return FamilyRecord(
        name=name,
        display_name=display_name,
        detect=is_flux_transformer(guidance=guidance),
        infer_config=unsupported_config,
        latent=FLUX_LATENT,
        towers=TOWERS,
        prediction="flow",
        defaults=Defaults(size=1024, steps=steps, sampler="euler", scale=1.0, a1111=False),
        units=UNITS,
        unet_in_channels=64,
        unet_heads=None,
        unet_activations=FLUX_ACTIVATIONS,
        loader=LOADER,
        lora=FLUX_LORA,
    )


FLUX_DEV_RECORD = flux_record(FLUX_DEV, "Flux.1 dev", guidance=True, steps=28)
FLUX_SCHNELL_RECORD = flux_record(FLUX_SCHNELL, "Flux.1 schnell", guidance=False, steps=4)

for _record in (FLUX_DEV_RECORD, FLUX_SCHNELL_RECORD):
    register(_record)

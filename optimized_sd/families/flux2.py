"""Flux.2 klein 4B and 9B (Black Forest Labs 2026) as family records: a rectified-flow transformer over 2x2-patchified
32-channel latents (128 channels, one token per 16x16 pixels), conditioned on Qwen3's layers 9, 18 and 27.

The step-distilled model (4 steps, one pass) and the base (CFG) have the same tensors, so they are two records
told apart by `--distilled`/`--base`, a diffusers folder's `model_index.json` or the file name
(`weights.flux2_keys.klein_is_distilled`); 4B and 9B are one family, their sizes read off the shapes. The files (a
diffusers folder naming Flux2KleinPipeline; or the transformer in BFL names, with or without ComfyUI's prefix, plus
`--text-encoder qwen_3_4b.safetensors` and `--vae`) open into one module tree with the memory engine's names:
`model.diffusion_model` (`models.flux2.Flux2`), `first_stage_model` (its VAE) and `text_encoders.qwen3`. The
pipeline class is `pipelines.flux2.KleinDiffusion`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from optimized_sd.errors import CheckpointError, FieldError, UserError
from optimized_sd.families.flux import fused_lora_names, loaded_model, unsupported_config
from optimized_sd.families.registry import Defaults, FamilyRecord, LatentFormat, Loader, LoraKeys, Shapes, TextTower, Units, register
from optimized_sd.models.sd import PartsModel

KLEIN, KLEIN_BASE = "flux2-klein", "flux2-klein-base"
TEXT_ROOT, QWEN_TOWER = PartsModel.text_root, "qwen3"
KLEIN_PIPELINE = "Flux2KleinPipeline"
PART_WORDS = {"transformer": "Flux.2 transformer", "qwen3": "Qwen3 text encoder", "vae": "Flux.2 VAE"}
PART_FIELDS = {"transformer": "checkpoint", "qwen3": "text_encoders", "vae": "vae"}  # the load field giving each part
PART_EXAMPLES = {"qwen3": "qwen_3_4b.safetensors", "vae": "flux2-vae.safetensors"}
FOLDERS = {"transformer": "transformer", "qwen3": "text_encoder", "vae": "vae"}  # a diffusers folder's parts
# Latent -> RGB of the 32 VAE channels (ComfyUI's `latent_formats.Flux2` factors, over the normalised latents
# unpatchified); a token's 2x2 patch of each channel averaged, so a preview is one pixel per token.
RGB_32 = (
    (0.0058, 0.0113, 0.0073), (0.0495, 0.0443, 0.0836), (-0.0099, 0.0096, 0.0644), (0.2144, 0.3009, 0.3652),
    (0.0166, -0.0039, -0.0054), (0.0157, 0.0103, -0.0160), (-0.0398, 0.0902, -0.0235), (-0.0052, 0.0095, 0.0109),
    (-0.3527, -0.2712, -0.1666), (-0.0301, -0.0356, -0.0180), (-0.0107, 0.0078, 0.0013), (0.0746, 0.0090, -0.0941),
    (0.0156, 0.0169, 0.0070), (-0.0034, -0.0040, -0.0114), (0.0032, 0.0181, 0.0080), (-0.0939, -0.0008, 0.0186),
    (0.0018, 0.0043, 0.0104), (0.0284, 0.0056, -0.0127), (-0.0024, -0.0022, -0.0030), (0.1207, -0.0026, 0.0065),
    (0.0128, 0.0101, 0.0142), (0.0137, -0.0072, -0.0007), (0.0095, 0.0092, -0.0059), (0.0000, -0.0077, -0.0049),
    (-0.0465, -0.0204, -0.0312), (0.0095, 0.0012, -0.0066), (0.0290, -0.0034, 0.0025), (0.0220, 0.0169, -0.0048),
    (-0.0332, -0.0457, -0.0468), (-0.0085, 0.0389, 0.0609), (-0.0076, 0.0003, -0.0043), (-0.0111, -0.0460, -0.0614),
)  # fmt: skip
KLEIN_LATENT = LatentFormat(  # no scale or shift: the VAE's batch-norm statistics normalise the latents
    channels=128, downscale=16, scale_factor=1.0,
    rgb_factors=tuple(tuple(v / 4 for v in row) for row in RGB_32 for _ in range(4)), rgb_bias=(-0.0329, -0.0718, -0.0851),
)  # fmt: skip


def hoisted_units(transformer: nn.Module) -> list[tuple[str, ...]]:
    """The units `precompute_modulation` runs once per sampling run, in its call order: the timestep embedder,
    then the shared adaLN linears one at a time (17 x hidden^2 weights together: 0.3 GB in bf16 for 4B)."""
    embedders = ("time_in", *(("guidance_in",) if transformer.config.guidance_embed else ()))
    return [embedders, *((name,) for name in transformer.modulation_modules())]


def hoisted_count(transformer: nn.Module) -> int:
    return len(hoisted_units(transformer))


def klein_units(transformer: nn.Module) -> list[tuple[str, ...]]:
    """The streamed units in call order: the hoisted ones, then per step the input projections, each block whole
    (Flux.2's blocks hold no modulation), the final norm and projection."""
    config = transformer.config
    return [
        *hoisted_units(transformer),
        ("img_in", "txt_in"),
        *((f"double_blocks.{i}",) for i in range(config.depth)),
        *((f"single_blocks.{i}",) for i in range(config.depth_single_blocks)),
        ("final_layer.norm_final", "final_layer.linear"),
    ]


# --- which files ---------------------------------------------------------------------------------------


def file_holds(path: Path) -> str | None:
    """Which klein part one safetensors or GGUF file holds ("transformer", "qwen3", "vae"), else None (headers only)."""
    from optimized_sd.weights.flux2_keys import VAE_TELLTALE, identify_flux2
    from optimized_sd.weights.gguf import is_gguf_file
    from optimized_sd.weights.loading import is_safetensors_file, open_weight_file
    from optimized_sd.weights.zimage_keys import QWEN3_TELLTALE

    if not path.is_file() or not (is_safetensors_file(path) or is_gguf_file(path)):
        return None
    source = open_weight_file(path)
    try:
        shapes = source.shapes()
    finally:
        source.close()
    try:
        identify_flux2(shapes, str(path), allow_dev=True)
        return "transformer"
    except CheckpointError:
        pass
    if QWEN3_TELLTALE in shapes or "model." + QWEN3_TELLTALE in shapes:
        return "qwen3"
    return "vae" if VAE_TELLTALE in shapes else None


def claims(path: Path) -> bool:
    """A diffusers Flux.2 folder, or a safetensors or GGUF file holding a Flux.2 transformer (dev too, refused by name); a
    Qwen3 file alone is Z-Image's to claim (`families.zimage`: its error names --text-encoder for both families)."""
    from optimized_sd.weights.diffusers_folder import pipeline_class

    path = Path(path)
    if path.is_dir():
        return pipeline_class(path).startswith("Flux2")
    try:
        return file_holds(path) == "transformer"
    except (CheckpointError, OSError):
        return False


def part_paths(path: Path, text_encoders: list[Path], vae: Path | None) -> dict[str, Path]:
    """Each part's file or folder: a diffusers folder's own, then the flags (which replace them)."""
    from optimized_sd.weights.diffusers_folder import pipeline_class

    parts: dict[str, Path] = {}
    if path.is_dir():
        kind = pipeline_class(path)
        if kind != KLEIN_PIPELINE:
            raise CheckpointError(f"{path} is a {kind} folder (Flux.2 [dev]), which this version does not run (klein runs)")
        parts = {part: path / folder for part, folder in FOLDERS.items() if (path / folder).is_dir()}
    else:
        held = file_holds(path)
        if held != "transformer":
            if not held:
                raise FieldError.about("checkpoint", f"{path} holds no Flux.2 part")
            words = f"a {PART_WORDS[held]}, not a Flux.2 transformer (what the checkpoint must be)"
            raise FieldError.about(PART_FIELDS[held], f"takes {path}: it holds {words}")
        parts["transformer"] = path
    if len(text_encoders) > 1:
        raise FieldError.about("text_encoders", f"gives {len(text_encoders)} files; Flux.2 klein takes one Qwen3 text encoder")
    parts.update({"qwen3": text_encoders[0]} if text_encoders else {})
    parts.update({"vae": vae} if vae is not None else {})
    for part in ("qwen3", "vae"):
        if part not in parts:
            problem = f"must give Flux.2 klein's {PART_WORDS[part]}, which {path.name} does not hold (e.g. {PART_EXAMPLES[part]})"
            raise FieldError.about(PART_FIELDS[part], problem)
    return parts


def prepare(path: Path | str, text_encoders: Iterable[Path | str] = (), vae: Path | str | None = None, distilled: bool | None = None):
    """Open the klein files into a model on `meta`, checked strictly (`weights.loading.LoadedModel`); Qwen3 is built
    up to layer 27 only. A part in the wrong flag, missing, or a Qwen3 of another width than the transformer
    reads is a one-line error."""
    from optimized_sd.config import ModelConfig, UNetConfig
    from optimized_sd.models.qwen3 import KLEIN_LAYERS
    from optimized_sd.weights.flux2_keys import klein_is_distilled, prepare_flux2_transformer, prepare_flux2_vae
    from optimized_sd.weights.zimage_keys import prepare_qwen3

    path = Path(path)
    parts = part_paths(path, [Path(p) for p in text_encoders], None if vae is None else Path(vae))
    components = {"transformer": prepare_flux2_transformer(parts["transformer"])}
    for part, field, build in (("qwen3", "text_encoders", lambda p: prepare_qwen3(p, KLEIN_LAYERS)), ("vae", "vae", prepare_flux2_vae)):
        try:
            components[part] = build(parts[part])
        except CheckpointError as error:  # a flag's file is that flag's error
            raise (error if path.is_dir() and parts[part].parent == path else FieldError.about(field, str(error))) from None
    transformer, qwen3 = components["transformer"].model, components["qwen3"].model
    width = transformer.config.context_in_dim // len(KLEIN_LAYERS)
    if width != qwen3.config.hidden_size:
        raise UserError(
            f"the Flux.2 transformer reads Qwen3 states {width} wide (klein 4B: Qwen3-4B, 2560; 9B: Qwen3-8B, 4096), "
            f"but the text encoder {parts['qwen3'].name} is {qwen3.config.hidden_size} wide"
        )
    vae_model = components["vae"].model
    family = KLEIN if klein_is_distilled(path, None if distilled is None else not distilled) else KLEIN_BASE
    config = ModelConfig(
        unet=UNetConfig(in_channels=transformer.config.in_channels, out_channels=transformer.config.out_channels,
                        context_dim=transformer.config.context_in_dim),
        vae=vae_model.config, text=None, scale_factor=1.0, family=family,
    )  # fmt: skip
    prefixes = {"transformer": "model.diffusion_model.", "vae": "first_stage_model.", "qwen3": f"{TEXT_ROOT}.{QWEN_TOWER}."}
    return loaded_model(PartsModel(config, transformer, vae_model, **{QWEN_TOWER: qwen3}), config, path, components, prefixes)


def describe(path: Path):
    """`inspect`: klein 4B or 9B, distilled or base, and which parts the file or folder holds (tensors, dtypes)."""
    import math
    from collections import Counter

    from optimized_sd.weights.diffusers_folder import pipeline_class
    from optimized_sd.weights.flux2_keys import identify_flux2, klein_is_distilled
    from optimized_sd.weights.inspect import (
        LAYOUT_DIFFUSERS,
        LAYOUT_SAFETENSORS,
        CheckpointInfo,
        PartStats,
        _safetensors_header,
        missing_hint,
    )

    path = Path(path)
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        info = CheckpointInfo(path=path, layout=f"{LAYOUT_DIFFUSERS} ({pipeline_class(path)})", file_size=size)
        files = {part: sorted((path / folder).glob("*.safetensors")) for part, folder in FOLDERS.items()}
    else:
        info = CheckpointInfo(path=path, layout=LAYOUT_SAFETENSORS, file_size=path.stat().st_size)
        files = {file_holds(path) or "transformer": [path]}
    dtypes: Counter[str] = Counter()
    for part, found in files.items():
        shapes: dict[str, tuple[int, ...]] = {}
        kinds: dict[str, str] = {}
        for file in found:
            more_shapes, more_kinds, info.metadata = _safetensors_header(file)
            shapes.update(more_shapes)
            kinds.update(more_kinds)
        if not shapes:
            continue
        dtypes.update(kinds.values())
        weights = sum(math.prod(shape) for shape in shapes.values())
        info.parts[PART_WORDS[part]] = PartStats(len(shapes), weights, tuple(sorted(set(kinds.values()))))
        if part == "transformer":
            try:
                size_name = identify_flux2(shapes, str(path)).size
                info.family = KLEIN if klein_is_distilled(path) else KLEIN_BASE
                info.towers = (f"Qwen3 layers 9, 18, 27 (klein {size_name})",)
            except CheckpointError as error:
                info.family_error = str(error)
    info.dtypes = dict(sorted(dtypes.items()))
    info.expected_parts = tuple(PART_WORDS.values())
    if info.family is None and not info.family_error:
        info.family_error = "a Qwen3 text encoder alone: a text encoder file, loaded beside a Flux.2 klein transformer"
    if info.family is not None:
        info.prediction = "flow matching (rectified flow, velocity)"
        info.default_size = 1024
    info.missing_hint = missing_hint({PART_WORDS[part]: PART_FIELDS[part] for part in PART_WORDS}, info.parts)
    return info


def pipeline(*args, **kwargs):
    from optimized_sd.pipelines.flux2 import KleinDiffusion

    return KleinDiffusion(*args, **kwargs)


def flux2_tables() -> tuple:
    from optimized_sd.weights.flux2_keys import DOUBLE_BLOCK_NAMES, FINAL_ADALN, SINGLE_BLOCK_NAMES, TOP_NAMES

    return TOP_NAMES, DOUBLE_BLOCK_NAMES, SINGLE_BLOCK_NAMES, FINAL_ADALN


def is_klein(shapes: Shapes) -> bool:
    """A Flux.2 klein transformer (any layout); the weights cannot say distilled or base: the distilled record's."""
    from optimized_sd.weights.flux2_keys import identify_flux2

    try:
        identify_flux2(dict(shapes))
    except CheckpointError:
        return False
    return True


# diffusers/peft name the transformer `transformer.` + diffusers names (ai-toolkit: `diffusion_model.` + BFL names);
# a LoRA of the Qwen3 text encoder is refused by name.
KLEIN_LORA = LoraKeys(
    diffusers={"transformer.": "unet", "diffusion_model.": "unet"},
    kohya={"lora_unet_": "unet"},
    denoiser_names=fused_lora_names(flux2_tables),
    telltale=r"(single_stream_modulation|to_qkv_mlp_proj)",
    unsupported={"text_encoder.": "Qwen3 text encoder", "lora_te1_": "Qwen3 text encoder"},
)
LOADER = Loader(claims=claims, prepare=prepare, pipeline=pipeline, options=("distilled",), describe=describe)
UNITS = Units(
    vae_encoder=("first_stage_model.encoder", "first_stage_model.quant_conv", "first_stage_model.bn"),
    vae_decoder=("first_stage_model.bn", "first_stage_model.post_quant_conv", "first_stage_model.decoder"),
    text_root=TEXT_ROOT,
    denoiser_units=klein_units,
    hoisted=hoisted_count,
)
TOWERS = (TextTower("qwen3", f"{TEXT_ROOT}.{QWEN_TOWER}.transformer.", "text_encoder", "tokenizer", lora_name=None),)
COMMON = dict(infer_config=unsupported_config, latent=KLEIN_LATENT, towers=TOWERS, prediction="flow", units=UNITS,
              unet_in_channels=128, unet_heads=None, loader=LOADER, lora=KLEIN_LORA)  # fmt: skip

# Defaults: the distilled model's 4 steps without CFG (BFL's model card); the base's are Flux2KleinPipeline's own
# (50 steps, guidance 4); both 1024x1024.
register(FamilyRecord(name=KLEIN, display_name="Flux.2 klein", detect=is_klein,
                      defaults=Defaults(size=1024, steps=4, sampler="euler", scale=1.0, a1111=False), **COMMON))  # type: ignore[arg-type]
register(FamilyRecord(name=KLEIN_BASE, display_name="Flux.2 klein base", detect=lambda shapes: False,
                      defaults=Defaults(size=1024, steps=50, sampler="euler", scale=4.0, a1111=False), **COMMON))  # type: ignore[arg-type]

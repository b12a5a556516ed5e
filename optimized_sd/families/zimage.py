"""Z-Image (Tongyi-MAI 2025: Z-Image-Turbo, distilled to 8 steps, and the base model) as a family record: a
single-stream DiT over 2x2 patches of Flux's 16-channel latents, conditioned on the second-to-last hidden state
of Qwen3-4B run over the prompt's chat template.

Its files are not one LDM checkpoint: the transformer (`z_image_turbo_bf16.safetensors` in the original names,
with or without ComfyUI's `model.diffusion_model.`, or a diffusers folder), Flux's `ae.safetensors` and the text
encoder `qwen_3_4b.safetensors` are files of their own, so the record brings a `Loader` that opens them into one
module tree under the memory engine's names: `model.diffusion_model` (the transformer), `first_stage_model`
(Flux's VAE) and `text_encoders.qwen3` (the Qwen3 tower, built only up to the layer it reads). The pipeline class
is `pipelines.zimage.ZImageDiffusion`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from optimized_sd.errors import CheckpointError, FieldError
from optimized_sd.families.flux import FLUX_LATENT, unsupported_config
from optimized_sd.families.registry import Defaults, FamilyRecord, Loader, LoraKeys, Shapes, TextTower, Units, register
from optimized_sd.models.sd import PartsModel
from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX

ZIMAGE = "zimage"
TEXT_ROOT, QWEN_TOWER = PartsModel.text_root, "qwen3"
PIPELINE_PREFIX = "ZImage"  # model_index.json's _class_name: ZImagePipeline, ZImageImg2ImgPipeline, ...
SHIFT = 3.0  # the scheduler's static shift (Z-Image-Turbo's scheduler_config.json)
TRANSFORMER_TELLTALES = ("layers.0.adaLN_modulation.0.weight", "all_x_embedder.2-1.weight")  # original, diffusers
QWEN3_TELLTALE = "layers.0.self_attn.q_norm.weight"
# Key parts of LLM-conditioned models this version does not run, named in their refusal.
UNSUPPORTED = (
    ("txt_norm.weight", "Qwen-Image"),
    ("double_stream_blocks.", "HiDream-I1"),
    ("layers.0.adaLN_modulation.1.weight", "Lumina Image 2.0"),
)
BLOCK_PARTS = ("attention_norm1", "attention", "attention_norm2", "ffn_norm1", "feed_forward", "ffn_norm2")


def hoisted_units(transformer: nn.Module) -> list[tuple[str, ...]]:
    """The units run once per sampling run, in the order `refine_captions` and `modulation` call them: the pad
    tokens and the caption branch (prompts only), the timestep embedder and every block's adaLN linear (t only)."""
    config = transformer.config
    return [
        ("pads",),
        ("cap_embedder",),
        *((f"context_refiner.{i}",) for i in range(config.num_refiner_layers)),
        ("t_embedder",),
        *((f"noise_refiner.{i}.adaLN_modulation",) for i in range(config.num_refiner_layers)),
        *((f"layers.{i}.adaLN_modulation",) for i in range(config.num_layers)),
        ("final_layer.adaLN_modulation",),
    ]


def hoisted_count(transformer: nn.Module) -> int:
    return len(hoisted_units(transformer))


def zimage_units(transformer: nn.Module) -> list[tuple[str, ...]]:
    """The transformer's streamed units in call order: the `hoisted_units`, then per step the patch embedder,
    each modulated block without its adaLN (first module to last as it runs), the final norm and projection."""
    config = transformer.config
    blocks = [f"noise_refiner.{i}" for i in range(config.num_refiner_layers)] + [f"layers.{i}" for i in range(config.num_layers)]
    return [
        *hoisted_units(transformer),
        ("x_embedder",),
        *(tuple(f"{block}.{part}" for part in BLOCK_PARTS) for block in blocks),
        ("final_layer.norm_final", "final_layer.linear"),
    ]


# --- which files ---------------------------------------------------------------------------------------


def file_keys(path: Path) -> set[str] | None:
    """The tensor names of a safetensors or GGUF file (header only), None for anything else (or a GGUF this version
    refuses: its loading names why)."""
    from optimized_sd.weights.gguf import is_gguf_file
    from optimized_sd.weights.loading import is_safetensors_file, open_weight_file

    try:
        if not path.is_file() or not (is_safetensors_file(path) or is_gguf_file(path)):
            return None
        source = open_weight_file(path)
        try:
            return set(source.keys())
        finally:
            source.close()
    except (CheckpointError, OSError):
        return None


def has_key(keys: Iterable[str], telltale: str) -> bool:
    return any(key in (telltale, COMFY_TRANSFORMER_PREFIX + telltale, "model." + telltale) for key in keys)


def claims(path: Path) -> bool:
    """A diffusers Z-Image folder; a safetensors or GGUF file holding a Z-Image transformer, a Qwen3 text encoder alone (so
    that its error names --text-encoder) or an LLM-conditioned model this version refuses by name."""
    from optimized_sd.weights.diffusers_folder import pipeline_class

    path = Path(path)
    if path.is_dir():
        return pipeline_class(path).startswith(PIPELINE_PREFIX)
    keys = file_keys(path)
    if keys is None:
        return False
    telltales = (*TRANSFORMER_TELLTALES, QWEN3_TELLTALE)
    return any(has_key(keys, telltale) for telltale in telltales) or unsupported_model(keys) is not None


def unsupported_model(keys: Iterable[str]) -> str | None:
    """The name of the LLM-conditioned model these keys belong to, when this version does not run it."""
    for key in keys:
        for telltale, name in UNSUPPORTED:
            if telltale in key:
                return name
    return None


def check_file(path: Path) -> None:
    """A one-line error for a --ckpt file that is not a Z-Image transformer."""
    keys = file_keys(path) or set()
    if not any(has_key(keys, telltale) for telltale in TRANSFORMER_TELLTALES):
        name = unsupported_model(keys)
        if name is not None:
            raise FieldError.about("checkpoint", f"{path} is a {name} model, which this version does not run")
        if has_key(keys, QWEN3_TELLTALE):
            words = "a Qwen3 text encoder, not a Z-Image or Flux.2 klein transformer (what the checkpoint must be)"
            raise FieldError.about("text_encoders", f"takes {path}: it holds {words}")


def open_vae(path: Path):
    """Flux's VAE in a file (BFL `ae.safetensors` names or diffusers') or a diffusers `vae/` folder, checked."""
    from optimized_sd.weights.flux_keys import flux_parts, identify_flux
    from optimized_sd.weights.flux_loading import prepare_vae
    from optimized_sd.weights.zimage_keys import open_weights

    source = open_weights(path)
    info = identify_flux(source.shapes(), str(path))
    if "vae" not in info.parts or "transformer" in info.parts:
        raise FieldError.about("vae", f"{path} holds no Flux VAE")
    return prepare_vae(flux_parts(source, info)["vae"])


def prepare(path: Path | str, text_encoders: Iterable[Path | str] = (), vae: Path | str | None = None):
    """Open the Z-Image files (the checkpoint, a `--text-encoder` Qwen3 file, `--vae`) into a model on `meta`,
    checked strictly (`weights.loading.LoadedModel`); a part missing is a one-line error naming its flag."""
    from optimized_sd.config import ModelConfig, UNetConfig
    from optimized_sd.models.flux import VAE_SCALE
    from optimized_sd.weights.loading import Checkpoint, LoadedModel, LoadReport
    from optimized_sd.weights.sources import ChainSource, RenamedSource
    from optimized_sd.weights.zimage_keys import prepare_qwen3, prepare_zimage_transformer

    path = Path(path)
    given = [Path(p) for p in text_encoders]
    if len(given) > 1:
        raise FieldError.about("text_encoders", f"gives {len(given)} files; Z-Image takes one Qwen3 text encoder")
    folder = path if path.is_dir() else None
    if folder is None:
        check_file(path)
    qwen_path = given[0] if given else (folder / "text_encoder" if folder is not None else None)
    vae_path = Path(vae) if vae is not None else (folder / "vae" if folder is not None else None)
    if qwen_path is None:
        problem = f"must give Z-Image's Qwen3 text encoder, which {path.name} does not hold (e.g. qwen_3_4b.safetensors)"
        raise FieldError.about("text_encoders", problem)
    if vae_path is None:
        raise FieldError.about("vae", f"must give Z-Image's Flux VAE, which {path.name} does not hold (e.g. ae.safetensors)")
    transformer = prepare_zimage_transformer(folder / "transformer" if folder is not None else path)
    try:
        qwen3 = prepare_qwen3(qwen_path)
    except CheckpointError as error:
        raise FieldError.about("text_encoders", str(error)) from None
    vae_component = open_vae(vae_path)
    width, hidden = transformer.model.config.cap_feat_dim, qwen3.model.config.hidden_size
    if width != hidden:
        problem = f"{qwen_path} is {hidden} wide; this Z-Image transformer takes {width}-wide captions (Qwen3-4B)"
        raise FieldError.about("text_encoders", problem)
    config = ModelConfig(
        unet=UNetConfig(in_channels=transformer.model.config.in_channels, out_channels=transformer.model.config.in_channels,
                        context_dim=width),
        vae=vae_component.model.config, text=None, scale_factor=VAE_SCALE, family=ZIMAGE,
    )  # fmt: skip
    model = PartsModel(config, transformer.model, vae_component.model, **{QWEN_TOWER: qwen3.model})
    components = {"model.diffusion_model.": transformer, "first_stage_model.": vae_component, f"{TEXT_ROOT}.{QWEN_TOWER}.": qwen3}
    source = ChainSource(
        RenamedSource(component.source, {prefix + key: key for key in component.source.keys()}) for prefix, component in components.items()
    )
    report = LoadReport()
    for component in components.values():
        report.known_extras.update(component.report.known_extras)
    return LoadedModel(model, config, Checkpoint(source, path), source, report)


def pipeline(*args, **kwargs):
    from optimized_sd.pipelines.zimage import ZImageDiffusion

    return ZImageDiffusion(*args, **kwargs)


def describe(path: Path):
    from optimized_sd.pipelines.zimage import describe_files

    return describe_files(path)


def lora_module_names(shapes: Shapes) -> dict[str, tuple]:
    """LoRA module name -> `weights.lora.Target`s in the transformer: the original names (ComfyUI's
    `diffusion_model.`, kohya's `lora_unet_`) and diffusers' (peft's `transformer.`): its to_q, to_k and to_v are
    the thirds of our fused `qkv`, the rest renamed by `zimage_keys.DIFFUSERS_RENAMES`."""
    from optimized_sd.weights.lora import Target
    from optimized_sd.weights.zimage_keys import DIFFUSERS_RENAMES, FUSED_QKV

    names = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        module = key[: -len(".weight")]
        names[module] = (Target(key),)
        if key.endswith(FUSED_QKV):
            stem, width = key[: -len(FUSED_QKV)], shape[0] // 3
            for index, part in enumerate(("to_q", "to_k", "to_v")):
                names[f"{stem}.attention.{part}"] = (Target(key, width * index, width),)
            continue
        theirs = module + "."
        for diffusers_part, original in DIFFUSERS_RENAMES:
            theirs = theirs.replace(original, diffusers_part)
        names[theirs[:-1]] = (Target(key),)
    return names


LOADER = Loader(claims=claims, prepare=prepare, pipeline=pipeline, describe=describe)
ZIMAGE_RECORD = FamilyRecord(
    name=ZIMAGE,
    display_name="Z-Image",
    detect=lambda shapes: any(key in shapes for key in TRANSFORMER_TELLTALES),
    infer_config=unsupported_config,
    latent=FLUX_LATENT,
    towers=(TextTower("qwen3", f"{TEXT_ROOT}.{QWEN_TOWER}.transformer.", "text_encoder", "tokenizer", lora_name=None),),
    prediction="flow",
    defaults=Defaults(size=1024, steps=8, sampler="euler", scale=0.0, a1111=False),  # Turbo's: 8 steps, no CFG pass
    units=Units(
        vae_encoder=("first_stage_model.encoder",),
        vae_decoder=("first_stage_model.decoder",),
        text_root=TEXT_ROOT,
        denoiser_units=zimage_units,
        hoisted=hoisted_count,
    ),
    unet_in_channels=16,
    unet_heads=None,
    loader=LOADER,
    # diffusers/peft `transformer.` + diffusers names, ComfyUI/musubi `diffusion_model.` + original names
    lora=LoraKeys(
        diffusers={"transformer.": "unet", "diffusion_model.": "unet"},
        kohya={"lora_unet_": "unet"},
        denoiser_names=lora_module_names,
        telltale=r"(context_refiner|noise_refiner)[._]\d+",
        unsupported={"text_encoder.": "Qwen3 text encoder", "lora_te_": "Qwen3 text encoder"},
    ),
)

register(ZIMAGE_RECORD)

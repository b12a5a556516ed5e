"""Tell a model family from a state dict's keys and shapes (a pure function; nothing is loaded).

Families are recognised by structure, not by widths, so tiny test models pass too:
  SD 1.x        LDM UNet with a conv (4-D) `proj_in` and a CLIP text encoder `cond_stage_model.transformer.`
                (a 9-channel `input_blocks.0.0`: an SD 1.x inpainting model);
  SD 2.x        LDM UNet with a linear `proj_in` and an OpenCLIP text encoder `cond_stage_model.model.`;
  SDXL          SGM layout: UNet with `label_emb`, `conditioner.embedders.0.transformer.` (CLIP ViT-L) and
                `conditioner.embedders.1.model.` (OpenCLIP bigG);
  SDXL refiner  SGM layout with `conditioner.embedders.0.model.` (bigG) alone.
Each has a 4-channel `input_blocks.0.0` conv and a text width equal to the UNet's context dim. Other
models raise `UnsupportedModelError` naming what they are (SD3, Flux, SD 2.x/SDXL inpainting...); files that are
not a whole checkpoint (a VAE, a LoRA, a diffusers component...) raise `CheckpointError` saying what
they look like.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from optimized_sd.errors import CheckpointError, UnsupportedModelError
from optimized_sd.families import registry
from optimized_sd.families.names import SD1, SD2, SDXL, SDXL_REFINER

__all__ = [
    "SD1",
    "SD2",
    "SDXL",
    "SDXL_REFINER",
    "PARTS",
    "SCHEDULE_BUFFERS",
    "canonical_key",
    "denoiser_family",
    "detect_family",
    "ema_key",
    "known_extra_key",
    "part_of_key",
]

# SDXL's `y` = [pooled text | one 256-wide Fourier embedding per size number] (SGM's ConcatTimestepEmbedderND);
# which numbers a family embeds is its record's `size_vector`.
SIZE_EMBEDDING_DIM = 256

# Key prefixes of an LDM checkpoint's parts, defined here once.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model."
CLIP_PREFIX = TEXT_ENCODER_PREFIX + "transformer."
# The one form CLIP text keys take once a checkpoint is opened (see `canonical_key`).
CLIP_TEXT_PREFIX = CLIP_PREFIX + "text_model."
OPENCLIP_PREFIX = TEXT_ENCODER_PREFIX + "model."
# LDM's LitEma keeps the EMA copy of the UNet under dot-less names, beside two counters.
EMA_PREFIX = "model_ema."
EMA_COUNTERS = frozenset({EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"})
EMBEDDERS_PREFIX = "conditioner.embedders."  # SDXL's text towers (SGM layout)
SDXL_CLIP_PREFIX = EMBEDDERS_PREFIX + "0.transformer."

# Display name -> key prefix of each part of an LDM checkpoint.
PARTS: dict[str, str] = {
    "UNet": UNET_PREFIX,
    "VAE": VAE_PREFIX,
    "text encoder": TEXT_ENCODER_PREFIX,
}

# DDPM schedule buffers CompVis's LatentDiffusion registers (recomputed from the config at load).
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)

# Top-level entries of a Lightning checkpoint (seen in state dicts flattened by hand).
_LIGHTNING_KEYS = frozenset(
    {
        "epoch",
        "global_step",
        "pytorch-lightning_version",
        "callbacks",
        "optimizer_states",
        "lr_schedulers",
        "hparams_name",
        "hyper_parameters",
        "loops",
        "native_amp_scaling_state",
    }
)

_TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")

# Other diffusion architectures, by a key only they have (the telltales diffusers' single-file loader uses).
_OTHER_ARCHITECTURES = (
    ("joint_blocks.0.context_block.", "a Stable Diffusion 3 (MMDiT) model"),
    ("double_blocks.0.img_attn.", "a Flux-style model, but not a whole Flux.1 transformer"),  # a whole one is claimed by its record
    ("clip_txt_mapper.", "a Stable Cascade stage C model"),
    ("down_blocks.1.0.channelwise.", "a Stable Cascade stage B model"),
    ("t_block.", "a PixArt (DiT) model"),
    ("add_embedding.image_norm.", "a Kandinsky 2.x UNet"),
    ("encoder_hid_proj.image_embeds.", "a Kandinsky 2.x UNet"),
)

# Prefixes under which a transformers CLIP text model sits (SD 1.x's, and SDXL's first tower).
_CLIP_MODEL_PREFIXES: tuple[str, ...] = (CLIP_PREFIX, SDXL_CLIP_PREFIX)


def canonical_key(key: str) -> str:
    """`key` with a CLIP text model's weights under `text_model.` (the form real SD 1.x files use).

    transformers versions disagree on that level (newer ones build CLIPTextModel without it), so
    files come both ways; `loading.open_checkpoint` applies this to every key once, and everything
    downstream (family detection, shape inference, inspect, the strict loader) sees this one form.
    """
    for prefix in _CLIP_MODEL_PREFIXES:
        if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
            return prefix + "text_model." + key[len(prefix) :]
    return key


def known_extra_key(key: str) -> str | None:
    """Why `key` is a known non-weight entry of an SD 1.x checkpoint, or None if it is not one.

    Returns one of:
      "schedule buffer"  DDPM buffers (`betas`, `alphas_cumprod`, ..., `logvar`), rebuilt from the config;
      "EMA"              `model_ema.*`: the decay/num_updates counters and, in non-pruned files, the
                         EMA copy of the UNet under dot-less names;
      "position_ids"     a CLIP text model's int64 `embeddings.position_ids` buffer (any tower, any key form);
      "logit_scale"      OpenCLIP's contrastive-loss temperature, unused for text conditioning;
      "v_pred marker"    the empty `v_pred` key some SD 2.x v files carry to say their prediction type;
      "training loss"    `first_stage_model.loss.*` (the VAE's discriminator/LPIPS, unused at inference);
      "lightning"        Lightning's top-level entries (`epoch`, `global_step`, ...);
      "ComfyUI fp8 scale or marker"  a mixed-precision file's per-layer `weight_scale` (read with its fp8 weight:
                         `pipelines.weight_storage`), `input_scale` and `comfy_quant` (unused: weights compute dequantised).
    The strict loader treats these as expected leftovers; any other unexpected key is reported.
    """
    if key in SCHEDULE_BUFFERS:
        return "schedule buffer"
    if key.startswith(EMA_PREFIX):
        return "EMA"
    if key.startswith(_TEXT_PREFIXES) and key.endswith("embeddings.position_ids"):
        return "position_ids"
    if key.startswith(_TEXT_PREFIXES) and key.endswith(".logit_scale"):
        return "logit_scale"
    if key == "v_pred":
        return "v_pred marker"
    if key.endswith((".weight_scale", ".input_scale", ".comfy_quant")):  # read by `weight_storage` with their weight
        return "ComfyUI fp8 scale or marker"
    if key.startswith(VAE_PREFIX + "loss."):
        return "training loss"
    if key in _LIGHTNING_KEYS:
        return "lightning"
    return None


def ema_key(key: str) -> str:
    """The EMA copy's name for a UNet key: `model.diffusion_model.input_blocks.0.0.weight` ->
    `model_ema.diffusion_modelinput_blocks00weight` (LitEma drops the dots)."""
    return EMA_PREFIX + "diffusion_model" + key[len(UNET_PREFIX) :].replace(".", "")


def part_of_key(key: str) -> str | None:
    """The part ("UNet", "VAE", "text encoder") a weight key belongs to; None for extras and strays."""
    if known_extra_key(key) is not None:
        return None
    if key.startswith("conditioner."):  # SDXL's towers (SGM layout)
        return "text encoder"
    for part, prefix in PARTS.items():
        if key.startswith(prefix):
            return part
    return None


def _any_prefix(keys: Iterable[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def _any_contains(keys: Iterable[str], *parts: str) -> bool:
    return any(p in k for k in keys for p in parts)


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The model family of a state dict given as key -> shape: the id of the first registered family record
    whose telltales it has ("sd1", "sd2", "sdxl", "sdxl_refiner" built in), or an error saying what it is.

    Raises UnsupportedModelError for other diffusion models (SD3, Flux, SD 2.x/SDXL inpainting, unCLIP...), and
    CheckpointError for things that are not a whole SD checkpoint.
    """
    if not shapes:
        raise CheckpointError("the state dict is empty: no tensors to identify")
    record = registry.detect(shapes)
    if record is not None:
        return record.family_id
    return classify_sd(shapes)  # no family claims it: raises what it is (or names an SD layout no record took)


def denoiser_family(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The family of a file that may hold only the denoiser (a GGUF UNet or transformer): a registered record's
    telltales (a Flux transformer, a whole checkpoint), else an LDM UNet's own (`label_emb`: SDXL; SD 1.x or 2.x
    by the attention layout); None when neither. What `--parts-from`, `--vae` and `--text-encoder` complete."""
    layout = sd_layout(shapes)
    if layout is None:
        record = registry.detect(shapes)
        return None if record is None else record.family_id
    if _any_prefix(shapes, *_TEXT_PREFIXES):
        return detect_family(shapes)
    return SDXL if _any_prefix(shapes, UNET_PREFIX + "label_emb.") else layout[0]


def classify_sd(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The SD family of a whole SD checkpoint's shapes, or the error saying why it is not one (the built-in
    records' `check`: other architectures, UNet-only files, unsupported variants, mismatched parts)."""
    keys = list(shapes)
    for telltale, what in _OTHER_ARCHITECTURES:
        if any(k.startswith(telltale) or "." + telltale in k for k in keys):
            raise UnsupportedModelError(f"this is {what} ({telltale}* keys); {RUNS}")
    if _any_prefix(keys, "control_model."):
        raise CheckpointError(
            "this looks like a ControlNet (control_model.* keys), not a Stable Diffusion checkpoint"
        )

    unet_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if unet_in is None:
        raise CheckpointError(_describe_non_sd(keys))
    if _any_prefix(keys, EMBEDDERS_PREFIX):
        return _classify_sgm(shapes, keys, tuple(unet_in))
    return _classify_ldm(shapes, keys, tuple(unet_in))


def sd_layout(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, int | None] | None:
    """(the SD family whose layout these keys have, the UNet's input channels) by telltales alone, raising
    nothing; None without an LDM UNet. What the built-in records' `detect` test; `classify_sd` says the rest."""
    unet_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if unet_in is None:
        return None
    in_channels = unet_in[1] if len(unet_in) == 4 else None
    keys = list(shapes)
    if _any_prefix(keys, EMBEDDERS_PREFIX):
        return (SDXL if _any_prefix(keys, EMBEDDERS_PREFIX + "0.transformer.") else SDXL_REFINER), in_channels
    has_clip = _any_prefix(keys, CLIP_PREFIX)
    linear_proj_in = any(len(shapes[k]) == 2 for k in keys if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight"))
    is_v2 = _any_prefix(keys, OPENCLIP_PREFIX) or linear_proj_in or (_context_dim(shapes, keys) == 1024 and not has_clip)
    return (SD2 if is_v2 else SD1), in_channels


RUNS = "optimized-sd runs SD 1.x, SD 2.x, SDXL and Flux.1 text-to-image models, and SD 1.x inpainting models"


def _context_dim(shapes: Mapping[str, tuple[int, ...]], keys: list[str]) -> int | None:
    """The UNet's cross-attention context width, from any `attn2.to_k` weight."""
    for key in keys:
        if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight") and len(shapes[key]) == 2:
            return shapes[key][1]
    return None


def _refuse_other_inputs(family: str, in_channels: int, keys: list[str], allowed: tuple[int, ...] = (4,)) -> None:
    """A UNet taking other than 4 latent channels is an inpainting/depth/upscaler/pix2pix variant; those
    in `allowed` run (SD 1.x's 9-channel inpainting)."""
    if in_channels in allowed:
        return
    if in_channels == 9:
        kind = f"{family} inpainting"
    elif in_channels == 5 and _any_prefix(keys, "depth_model."):
        kind = "SD 2.x depth-to-image"
    elif in_channels == 7 and _any_prefix(keys, "low_scale_model."):
        kind = "SD 2.x x4 upscaler"
    elif in_channels == 8:
        kind = f"InstructPix2Pix ({family})"
    else:
        kind = f"{family}-style model with a {in_channels}-channel UNet input"
    raise UnsupportedModelError(
        f"this is an {kind} model (UNet input_blocks.0.0 takes {in_channels} channels); {RUNS}"
    )


def _check_context(context: int | None, width: int | None, towers: str) -> None:
    if context is not None and width is not None and context != width:
        raise CheckpointError(
            f"the UNet's cross-attention context dim is {context} but the {towers} {width} wide; "
            "the parts do not belong together"
        )


def check_label_width(family: str, label_width: int | None, pooled_width: int | None) -> None:
    """CheckpointError, naming both widths, unless the UNet's `label_emb` takes exactly what the family
    builds for it (pooled text + its record's size numbers x 256): else the first step fails on a matrix shape."""
    record = registry.by_name(family)
    numbers = record.size_numbers
    if not numbers or label_width is None:
        return
    kind = record.display_name
    if pooled_width is None:
        raise CheckpointError(f"this {kind} checkpoint's bigG text encoder has no text_projection (the pooled text its UNet takes)")
    expected = pooled_width + numbers * SIZE_EMBEDDING_DIM
    if label_width != expected:
        raise CheckpointError(
            f"the UNet's label_emb takes {label_width}-wide vectors but an {kind} model builds {expected} "
            f"({pooled_width} pooled text + {numbers} x {SIZE_EMBEDDING_DIM} size embeddings); the parts do not belong together"
        )


def _openclip_width(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int | None:
    shape = shapes.get(prefix + "ln_final.weight")
    return shape[0] if shape else None


def _classify_sgm(shapes: Mapping[str, tuple[int, ...]], keys: list[str], unet_in: tuple[int, ...]) -> str:
    """Classify an SGM-layout state dict (`conditioner.embedders.*`): SDXL base or refiner."""
    clip_l = _any_prefix(keys, EMBEDDERS_PREFIX + "0.transformer.")
    big_g = EMBEDDERS_PREFIX + ("1.model." if clip_l else "0.model.")
    family, kind = (SDXL, "SDXL") if clip_l else (SDXL_REFINER, "SDXL refiner")
    if len(unet_in) != 4:
        raise CheckpointError(f"{UNET_PREFIX}input_blocks.0.0.weight has shape {unet_in}; expected a 4-D conv weight")
    _refuse_other_inputs(kind, unet_in[1], keys)
    if not _any_prefix(keys, big_g):
        raise CheckpointError(f"this {kind} checkpoint has no OpenCLIP bigG text encoder ({big_g}* keys)")
    if not _any_prefix(keys, UNET_PREFIX + "label_emb."):
        raise CheckpointError(f"this {kind} checkpoint's UNet has no label_emb (the pooled-text and size conditioning)")
    width = _openclip_width(shapes, big_g) or 0
    if clip_l:
        width += _clip_width(shapes, EMBEDDERS_PREFIX + "0.transformer.") or 0
    _check_context(_context_dim(shapes, keys), width or None, "text encoders together are")
    return family


def _classify_ldm(shapes: Mapping[str, tuple[int, ...]], keys: list[str], unet_in: tuple[int, ...]) -> str:
    """Classify a state dict that has an LDM UNet (`model.diffusion_model.*`): SD 1.x or SD 2.x."""
    if len(unet_in) != 4:
        raise CheckpointError(
            f"{UNET_PREFIX}input_blocks.0.0.weight has shape {unet_in}; expected a 4-D conv weight"
        )
    in_channels = unet_in[1]
    has_clip = _any_prefix(keys, CLIP_PREFIX)
    has_openclip = _any_prefix(keys, OPENCLIP_PREFIX)
    proj_in_dims = {
        len(shapes[k]) for k in keys if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")
    }
    context = _context_dim(shapes, keys)

    is_v2 = has_openclip or 2 in proj_in_dims or (context == 1024 and not has_clip)
    family = "SD 2.x" if is_v2 else "SD 1.x"

    if _any_prefix(keys, UNET_PREFIX + "label_emb."):
        if _any_prefix(keys, "embedder.", "noise_augmentor."):
            raise UnsupportedModelError(f"this is an SD 2.x unCLIP model (label_emb, image embedder keys); {RUNS}")
        raise UnsupportedModelError(
            "this UNet has a class/label embedding (model.diffusion_model.label_emb) but no SDXL "
            f"conditioner.embedders.* text encoders; {RUNS}"
        )
    # SD 1.x inpainting UNets (sd-v1-5-inpainting) take 9 channels: latents + mask + masked-image latents.
    _refuse_other_inputs(family, in_channels, keys, allowed=(4,) if is_v2 else (4, 9))
    if not proj_in_dims:
        raise CheckpointError(
            "this LDM UNet has no cross-attention (no *.proj_in.weight keys); not a Stable Diffusion UNet"
        )
    if is_v2:
        if not has_openclip:
            raise CheckpointError(
                "this has an SD 2.x UNet but no OpenCLIP text encoder (no cond_stage_model.model.* keys); "
                "a UNet-only file is not a whole SD 2.x checkpoint"
            )
        _check_context(context, _openclip_width(shapes, OPENCLIP_PREFIX), "OpenCLIP text encoder is")
        return SD2
    if not has_clip:
        raise CheckpointError(
            "this has an LDM UNet but no CLIP text encoder (no cond_stage_model.transformer.* keys); "
            "a UNet-only file is not a whole SD 1.x checkpoint"
        )
    _check_context(context, _clip_width(shapes), "CLIP text encoder is")
    return SD1


def _clip_width(shapes: Mapping[str, tuple[int, ...]], prefix: str = CLIP_PREFIX) -> int | None:
    """Hidden width of a CLIP text encoder under `prefix` (keys in `canonical_key` form), from its final layer norm."""
    shape = shapes.get(prefix + "text_model.final_layer_norm.weight")
    return shape[0] if shape else None


def _describe_non_sd(keys: list[str]) -> str:
    """A one-line description of a state dict with no LDM UNet."""
    n = len(keys)
    if _any_prefix(keys, "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"):
        return "this is a LoRA (lora_unet_/lora_te_ keys), not a Stable Diffusion checkpoint"
    if _any_contains(keys, ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "_lora.down.", ".lora.down."):
        return "this is a LoRA (lora_down/lora_up or lora_A/lora_B keys), not a Stable Diffusion checkpoint"
    if _any_prefix(keys, "emb_params", "string_to_param", "clip_l", "clip_g") and n <= 4:
        return "this is a textual-inversion embedding, not a Stable Diffusion checkpoint"
    if _any_prefix(keys, "input_blocks.0.0.weight", "middle_block.", "output_blocks."):
        return (
            "this is a UNet alone with LDM keys lacking the model.diffusion_model. prefix, "
            "not a whole Stable Diffusion checkpoint"
        )
    if _any_prefix(keys, UNET_PREFIX):
        return (
            "this has model.diffusion_model.* keys but no input_blocks.0.0.weight; "
            "not an LDM UNet this version knows"
        )
    diffusers = _diffusers_component(keys)
    if diffusers:
        return (
            f"this is a diffusers {diffusers} file, not a single-file checkpoint; "
            "pass the diffusers folder (the one holding model_index.json) instead"
        )
    has_vae = _any_prefix(keys, VAE_PREFIX) or _any_prefix(
        keys, "encoder.down.", "decoder.up.", "encoder.conv_in.", "decoder.conv_out.", "quant_conv."
    )
    has_te = _any_prefix(keys, CLIP_PREFIX, OPENCLIP_PREFIX, EMBEDDERS_PREFIX)
    if has_vae and not has_te:
        return "this is a VAE alone, not a whole Stable Diffusion checkpoint"
    if has_te and not has_vae:
        return "this is a text encoder alone, not a whole Stable Diffusion checkpoint"
    if has_te and has_vae:
        return "this has a VAE and a text encoder but no UNet (model.diffusion_model.*)"
    first = ", ".join(keys[:3])
    return f"no Stable Diffusion keys: first keys are {first} ({n} tensors)"


def _diffusers_component(keys: list[str]) -> str | None:
    """Which diffusers/transformers component a key set looks like, if any."""
    if _any_prefix(keys, "encoder.down_blocks.", "decoder.up_blocks."):
        return "VAE (AutoencoderKL)"
    if _any_prefix(keys, "controlnet_cond_embedding."):
        return "ControlNet"
    if _any_prefix(keys, "down_blocks.", "up_blocks.", "mid_block.", "time_embedding."):
        return "UNet (UNet2DConditionModel)"
    if _any_prefix(keys, "text_model.", "text_projection."):
        return "text encoder (CLIPTextModel)"
    return None

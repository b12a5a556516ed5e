"""The built-in Stable Diffusion families: SD 1.x, SD 1.x inpainting, SD 2.x, SDXL base and SDXL refiner.

Each is one `FamilyRecord`; their differences (towers, heads, scale factor, vectors, LoRA names, planner
constants) are fields here and nowhere else. Registered when the registry is first asked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from optimized_sd.families.names import SD1, SD1_INPAINTING, SD2, SDXL, SDXL_REFINER
from optimized_sd.families.registry import (
    Defaults,
    DiffusersLayout,
    FamilyRecord,
    LatentFormat,
    LoraKeys,
    Shapes,
    TextTower,
    Units,
    register,
)
from optimized_sd.memory.planner import UnetActivations
from optimized_sd.weights.family import (
    CLIP_PREFIX,
    EMBEDDERS_PREFIX,
    OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    classify_sd,
    sd_layout,
)
from optimized_sd.weights.infer import infer_from_towers, unrun_openclip_layer

OPEN_CLIP_PAD_ID = 0  # open_clip's tokenizer pads with 0 (models.text_encoder says the same)
INPAINTING_CHANNELS = 9  # latents + mask + masked-image latents

# The refiner's aesthetic-score conditioning: diffusers' defaults for the prompt and the negative prompt.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5

# Latent channel -> (R, G, B) for latents in model space (already times the scale factor), fitted on VAE decodes
# (the widely used factors of ComfyUI's `latent_formats`: SD15 for SD 1.x and SD 2.x, which share the VAE; SDXL's own).
SD_LATENT = LatentFormat(
    scale_factor=0.18215,
    rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
)
SDXL_LATENT = LatentFormat(
    scale_factor=0.13025,
    rgb_factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    rgb_bias=(0.1084, -0.0175, -0.0011),
)


def layout_is(family: str, inpainting: bool = False):
    """A `detect` for one SD layout: these telltales (`weights.family.sd_layout`), a 9-channel UNet or not."""

    def detect(shapes: Shapes) -> bool:
        found = sd_layout(shapes)
        return found is not None and found[0] == family and (found[1] == INPAINTING_CHANNELS) == inpainting

    return detect


def sd_check(shapes: Shapes) -> None:
    """What is wrong with a file of an SD layout (other architectures' keys, missing towers, unsupported
    variants, parts that do not belong together): `weights.family.classify_sd` raises it."""
    classify_sd(shapes)


def sdxl_base_vector(height: int, width: int, negative: bool) -> tuple[float, ...]:
    """SDXL base's `y` numbers: original (h, w) = the image, crop (0, 0), target (h, w) = the image."""
    return (height, width, 0, 0, height, width)


def sdxl_refiner_vector(height: int, width: int, negative: bool) -> tuple[float, ...]:
    """The refiner's `y` numbers: original (h, w), crop (0, 0), an aesthetic score (lower for the negative)."""
    return (height, width, 0, 0, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE)


def named_768(path: Path) -> bool:
    """SD 2.x's 768 checkpoints are its v-prediction ones (a documented heuristic; `--prediction` overrides it)."""
    return "768" in path.name


SD1_RECORD = FamilyRecord(
    name=SD1,
    display_name="SD 1.x",
    detect=layout_is(SD1),
    check=sd_check,
    infer_config=infer_from_towers,
    latent=SD_LATENT,
    towers=(TextTower("clip", CLIP_PREFIX, "text_encoder", "tokenizer"),),
    # SD 1.x at 512x512: 11,350-13,040 (H100 2026-11-27, H200 2026-11-30), 8,055 with the chunked feed-forward.
    unet_activations=UnetActivations(14_000, 0.65),
    lora=LoraKeys(
        kohya={"lora_unet_": "unet", "lora_te_": "text"},
        diffusers={"unet.": "unet", "text_encoder.": "text"},
        context_width=768,
        text_width=768,
    ),
    diffusers=DiffusersLayout(linear_projection=False),
    unet_heads=8,
)

SD1_INPAINTING_RECORD = replace(
    SD1_RECORD,
    name=SD1_INPAINTING,
    display_name="SD 1.x inpainting",
    family=SD1,
    detect=layout_is(SD1, inpainting=True),
    priority=1,
    unet_in_channels=INPAINTING_CHANNELS,
)

SD2_RECORD = FamilyRecord(
    name=SD2,
    display_name="SD 2.x",
    detect=layout_is(SD2),
    check=sd_check,
    infer_config=infer_from_towers,
    unused_keys=unrun_openclip_layer,
    latent=SD_LATENT,
    towers=(TextTower("open_clip", OPENCLIP_PREFIX, "text_encoder", "tokenizer", pad_id=OPEN_CLIP_PAD_ID),),
    v_capable=True,
    prediction_hint=named_768,
    prediction_hint_reason="SD 2.x default for a 768 file",
    defaults=Defaults(size=512, v_size=768),
    # SD 2.x has SD 1.x's channels and attention levels (64-wide heads); its one measured figure, `stream`
    # at 768x768 (H200 2026-11-30), is 4,437, below SD 1.x's stream estimate of 9,100: SD 1.x's constants hold.
    unet_activations=UnetActivations(14_000, 0.65),
    lora=LoraKeys(
        kohya={"lora_unet_": "unet", "lora_te_": "text"},
        diffusers={"unet.": "unet", "text_encoder.": "text"},
        context_width=1024,
        text_width=1024,
    ),
    diffusers=DiffusersLayout(linear_projection=True),
    unet_heads=None,
)

SDXL_RECORD = FamilyRecord(
    name=SDXL,
    display_name="SDXL",
    detect=layout_is(SDXL),
    check=sd_check,
    infer_config=infer_from_towers,
    latent=SDXL_LATENT,
    towers=(
        TextTower("clip", SDXL_CLIP_PREFIX, "text_encoder", "tokenizer", penultimate=True),
        TextTower("open_clip", EMBEDDERS_PREFIX + "1.model.", "text_encoder_2", "tokenizer_2", OPEN_CLIP_PAD_ID, True, "text_2"),
    ),
    conditioner="sgm",
    size_vector=sdxl_base_vector,
    zero_empty_negative=True,
    v_capable=True,
    defaults=Defaults(size=1024),
    # SDXL at 1024x1024 (H200 2026-11-30): 8,315 in `full`, 6,667 in `turbo`, 4,439 in `stream` (0.53 of
    # full). No attention at the highest resolution, hence well below SD 1.x.
    unet_activations=UnetActivations(9_200, 0.60),
    units=Units(text_root="conditioner"),
    lora=LoraKeys(
        kohya={"lora_unet_": "unet", "lora_te1_": "text", "lora_te2_": "text_2"},
        diffusers={"unet.": "unet", "text_encoder.": "text", "text_encoder_2.": "text_2"},
        context_width=2048,
    ),
    diffusers=DiffusersLayout(linear_projection=True, addition_embed_type="text_time"),
    unet_heads=None,
    refiner=SDXL_REFINER,
)

SDXL_REFINER_RECORD = FamilyRecord(
    name=SDXL_REFINER,
    display_name="SDXL refiner",
    detect=layout_is(SDXL_REFINER),
    check=sd_check,
    infer_config=infer_from_towers,
    latent=SDXL_LATENT,
    # no LoRA format names the refiner's tower: its LoRAs patch the UNet
    towers=(TextTower("open_clip", EMBEDDERS_PREFIX + "0.model.", "text_encoder_2", "tokenizer_2", OPEN_CLIP_PAD_ID, True, None),),
    conditioner="sgm",
    size_vector=sdxl_refiner_vector,
    defaults=Defaults(size=1024),
    units=Units(text_root="conditioner"),
    lora=LoraKeys(kohya={"lora_unet_": "unet"}, diffusers={"unet.": "unet"}),
    diffusers=DiffusersLayout(linear_projection=True, addition_embed_type="text_time"),
    unet_heads=None,
)

for _record in (SD1_RECORD, SD1_INPAINTING_RECORD, SD2_RECORD, SDXL_RECORD, SDXL_REFINER_RECORD):
    register(_record)

"""What one generation call asks for and what it gives back, and the checks that need the model's config.

`GenerationRequest` is the per-batch call a `Job` (the one request every front end builds) makes; its
checks raise `FieldError` naming the request field, which each front end says in its own words."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from torch import Tensor

from optimized_sd.config import ModelConfig
from optimized_sd.errors import FieldError, UserError
from optimized_sd.pipelines.bounds import check_numbers
from optimized_sd.pipelines.controlnet import ControlNetSpec, check_controlnets
from optimized_sd.pipelines.defaults import DEFAULT_DOWNSCALE, DEFAULT_ETA, DEFAULT_REFINER_SWITCH, DEFAULT_STRENGTH
from optimized_sd.pipelines.masks import InpaintOptions
from optimized_sd.pipelines.output import ImageParameters
from optimized_sd.prompts.syntax import check_prompts

if TYPE_CHECKING:
    from optimized_sd.pipelines.hires import HiresFix


@dataclass
class GenerationRequest:
    """Everything one call needs; txt2img is the case without `init_image`, inpainting the case
    with `init_image` and `inpaint` (whose generation size is height x width)."""

    prompts: list[str]
    negative_prompt: str = ""
    steps: int | None = None  # None: the family's (its record's `defaults`: SD 50, Flux.1 dev 28, schnell 4)
    scale: float | None = None  # None: the family's (SD 7.5; Flux 1: no CFG pass)
    eta: float = DEFAULT_ETA
    sampler: str | None = None  # None: the family's (SD plms, Flux euler)
    karras: bool = False
    seed: int | None = None
    height: int | None = None  # None: the family's size (512 SD 1.x / SD 2.x base, 768 SD 2.x v, 1024 SDXL)
    width: int | None = None
    latent_channels: int | None = None  # None: the model's (SD 4, Flux 16)
    downscale: int = DEFAULT_DOWNSCALE
    unet_batch: int | None = None
    init_image: Image.Image | None = None
    strength: float = DEFAULT_STRENGTH
    inpaint: InpaintOptions | None = None
    loras: Mapping[str | Path, float] | Sequence[str] | None = None  # {file: weight} or ['FILE[:WEIGHT]']
    schedule: str | None = None  # the k-samplers' sigma grid (sampling.SCHEDULE_TYPES); None: the default
    refiner: str | Path | None = None  # an SDXL refiner that takes over from an SDXL base at `refiner_switch`
    refiner_switch: float = DEFAULT_REFINER_SWITCH  # the share of the denoising the base runs (AUTOMATIC1111's "Refiner switch at")
    hires: HiresFix | None = None  # txt2img only: AUTOMATIC1111's hires fix, a second img2img pass at a larger size
    guidance: float | None = None  # a guidance-distilled model's guidance value (Flux.1 dev; None: its default, 3.5)
    max_sequence_length: int | None = None  # T5 tokens per prompt (Flux.1: 1..512; None: dev 512, schnell 256)
    cfg_normalization: float | None = None  # Z-Image only (None: its pipeline's, 0 = off; see pipelines.defaults)
    cfg_truncation: float | None = None  # Z-Image only (None: its pipeline's, 1 = never)
    controlnets: Sequence[ControlNetSpec] = ()  # ControlNet units (`pipelines.controlnet.control_specs` builds them)
    unguided_scale: float = 1.0  # the scale meaning no guidance: 1 for uncond + s (cond - uncond); 0 for cond + s (cond - uncond)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs unless the scale is exactly the family's no-guidance value (1; Z-Image 0)."""
        return self.scale != self.unguided_scale


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[ImageParameters] = field(default_factory=list)
    latents: Tensor | None = None  # the sampler's output, before VAE decoding (for parity checks)


INPAINTING_UNET_CHANNELS = 9  # latents (4) + mask (1) + masked-image latents (4)


def check_size(height: int, width: int, multiple: int = 8) -> None:
    """H and W must be multiples of 8 (the VAE's downscale); say the nearest valid size."""
    if multiple < 1:
        raise FieldError.about("downscale", f"{multiple}: the VAE downscale factor must be at least 1")
    for name, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            nearest = max(multiple, int(round(value / multiple)) * multiple)
            raise FieldError.about(name, f"{value} is not a multiple of {multiple}; the nearest valid size is {nearest}")


MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


def check_seeds(seed: int | None, count: int) -> None:
    """Seeds seed .. seed + count - 1 must all be valid generator seeds (0 .. 2^64 - 1)."""
    if seed is None:
        return
    if seed < 0 or seed > MAX_SEED:
        raise FieldError.about("seed", f"must be between 0 and 2^64-1 ({MAX_SEED}), got {seed}")
    if seed + count - 1 > MAX_SEED:
        largest = MAX_SEED - count + 1
        problem = f"{seed}: its {count} images would use seeds past 2^64-1; the largest first seed for them is {largest}"
        raise FieldError.about("seed", problem)


def check_request(request: GenerationRequest, config: ModelConfig) -> None:
    """What a request must agree on with the loaded model (FieldError naming the field otherwise)."""
    if not request.prompts:
        raise UserError("no prompt given")
    check_prompts(request.prompts, request.negative_prompt)
    check_numbers(
        steps=request.steps, scale=request.scale, eta=request.eta, strength=request.strength,
        guidance=request.guidance, max_sequence_length=request.max_sequence_length,
        cfg_normalization=request.cfg_normalization, cfg_truncation=request.cfg_truncation,
    )  # fmt: skip
    check_seeds(request.seed, len(request.prompts))
    check_size(request.height, request.width, request.downscale)
    if request.latent_channels != config.vae.latent_channels:
        channels = config.vae.latent_channels
        raise FieldError.about("latent_channels", f"{request.latent_channels}: this model's latents have {channels} channels")
    if request.inpaint is not None:
        if request.init_image is None:
            raise FieldError("init_image", "inpainting needs an init image", "is missing: inpainting needs one")
        request.inpaint.check()
    elif config.unet.in_channels == INPAINTING_UNET_CHANNELS:
        raise UserError("this is an inpainting model (9-channel UNet): inpaint it with a mask (or an outpaint border)")
    if request.downscale != config.vae.downscale:
        raise FieldError.about("downscale", f"{request.downscale}: this model's VAE downscales by {config.vae.downscale}")
    if request.unet_batch is not None and request.unet_batch < 1:
        raise FieldError.about("unet_batch", "must be at least 1")
    if request.refiner is not None:
        check_refiner_switch(request.refiner_switch)
    check_controlnets(request.controlnets)


def check_refiner_switch(switch: float) -> None:
    """The refiner takes over strictly inside the denoising: 0 would be the refiner alone, 1 the base alone."""
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0.0 < switch < 1.0:
        raise FieldError.about("refiner_switch", f"{switch} must be between 0 and 1 (exclusive): the share of the steps the base runs")

"""What one generation call asks for and what it gives back, and the checks that need the model's config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch import Tensor

from optimized_sd.config import REFINER_SWITCH_DEFAULT, ModelConfig
from optimized_sd.errors import FieldError, UserError
from optimized_sd.pipelines.bounds import check_numbers
from optimized_sd.pipelines.masks import InpaintOptions
from optimized_sd.pipelines.output import ImageParameters
from optimized_sd.prompts.syntax import check_prompts


@dataclass
class GenerationRequest:
    """Everything one call needs; txt2img is the case without `init_image`, inpainting the case
    with `init_image` and `inpaint` (whose generation size is height x width)."""

    prompts: list[str]
    negative_prompt: str = ""
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    sampler: str = "plms"
    karras: bool = False
    seed: int | None = None
    height: int | None = None  # None: the family's size (512 SD 1.x / SD 2.x base, 768 SD 2.x v, 1024 SDXL)
    width: int | None = None
    latent_channels: int = 4
    downscale: int = 8
    unet_batch: int | None = None
    init_image: Image.Image | None = None
    strength: float = 0.75
    inpaint: InpaintOptions | None = None
    loras: Mapping[str | Path, float] | Sequence[str] | None = None  # {file: weight} or ['FILE[:WEIGHT]']
    schedule: str | None = None  # the k-samplers' sigma grid (sampling.SCHEDULE_TYPES); None: the default
    refiner: str | Path | None = None  # an SDXL refiner that takes over from an SDXL base at `refiner_switch`
    refiner_switch: float = REFINER_SWITCH_DEFAULT  # the share of the denoising the base runs (AUTOMATIC1111's "Refiner switch at")

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs unless the scale is exactly 1."""
        return self.scale != 1.0


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
        raise UserError(f"--f {multiple}: the VAE downscale factor must be at least 1")
    for name, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            nearest = max(multiple, int(round(value / multiple)) * multiple)
            raise UserError(f"{name} {value} is not a multiple of {multiple}; the nearest valid size is {nearest}")


MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


def check_seeds(seed: int | None, count: int) -> None:
    """Seeds seed .. seed + count - 1 must all be valid generator seeds (0 .. 2^64 - 1)."""
    if seed is None:
        return
    if seed < 0 or seed > MAX_SEED:
        problem = f"must be between 0 and 2^64-1 ({MAX_SEED}), got {seed}"
        raise FieldError("seed", f"--seed {problem}", problem)
    if seed + count - 1 > MAX_SEED:
        largest = MAX_SEED - count + 1
        problem = f"{seed}: its {count} images would use seeds past 2^64-1; the largest first seed for them is {largest}"
        raise FieldError("seed", f"--seed {problem}", problem)


def check_request(request: GenerationRequest, config: ModelConfig) -> None:
    """What a request must agree on with the loaded model (UserError otherwise)."""
    if not request.prompts:
        raise UserError("no prompt given")
    check_prompts(request.prompts, request.negative_prompt)
    check_numbers(steps=request.steps, scale=request.scale, eta=request.eta, strength=request.strength)
    check_seeds(request.seed, len(request.prompts))
    check_size(request.height, request.width, request.downscale)
    if request.latent_channels != config.vae.embed_dim:
        raise UserError(f"--C {request.latent_channels}: this model's latents have {config.vae.embed_dim} channels")
    if request.inpaint is not None:
        if request.init_image is None:
            raise UserError("inpainting needs an init image")
        request.inpaint.check()
    elif config.unet.in_channels == INPAINTING_UNET_CHANNELS:
        raise UserError("this is an inpainting model (9-channel UNet): use inpaint with a mask (or --outpaint)")
    if request.downscale != config.vae.downscale:
        raise UserError(f"--f {request.downscale}: this model's VAE downscales by {config.vae.downscale}")
    if request.unet_batch is not None and request.unet_batch < 1:
        raise UserError("--unet_bs must be at least 1")
    if request.refiner is not None:
        check_refiner_switch(request.refiner_switch)


def check_refiner_switch(switch: float) -> None:
    """The refiner takes over strictly inside the denoising: 0 would be the refiner alone, 1 the base alone."""
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0.0 < switch < 1.0:
        raise UserError(f"--refiner-switch {switch} must be between 0 and 1 (exclusive): the share of the steps the base runs")

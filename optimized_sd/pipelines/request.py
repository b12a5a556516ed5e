"""What one generation call asks for and what it gives back, and the checks that need the model's config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch import Tensor

from optimized_sd.config import ModelConfig
from optimized_sd.errors import UserError
from optimized_sd.pipelines.output import ImageParameters


@dataclass
class GenerationRequest:
    """Everything one call needs; txt2img is the case without `init_image`."""

    prompts: list[str]
    negative_prompt: str = ""
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    sampler: str = "plms"
    karras: bool = False
    seed: int | None = None
    height: int = 512
    width: int = 512
    latent_channels: int = 4
    downscale: int = 8
    unet_batch: int | None = None
    init_image: Image.Image | None = None
    strength: float = 0.75
    loras: Mapping[str | Path, float] | Sequence[str] | None = None  # {file: weight} or ['FILE[:WEIGHT]']
    schedule: str | None = None  # the k-samplers' sigma grid (sampling.SCHEDULE_TYPES); None: the default

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


def check_size(height: int, width: int, multiple: int = 8) -> None:
    """H and W must be multiples of 8 (the VAE's downscale); say the nearest valid size."""
    for name, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            nearest = max(multiple, int(round(value / multiple)) * multiple)
            raise UserError(f"{name} {value} is not a multiple of {multiple}; the nearest valid size is {nearest}")


def check_request(request: GenerationRequest, config: ModelConfig) -> None:
    """What a request must agree on with the loaded model (UserError otherwise)."""
    if not request.prompts:
        raise UserError("no prompt given")
    check_size(request.height, request.width, request.downscale)
    if request.latent_channels != config.unet.in_channels:
        raise UserError(f"--C {request.latent_channels}: this model's latents have {config.unet.in_channels} channels")
    if request.downscale != config.vae.downscale:
        raise UserError(f"--f {request.downscale}: this model's VAE downscales by {config.vae.downscale}")
    if request.unet_batch is not None and request.unet_batch < 1:
        raise UserError("--unet_bs must be at least 1")

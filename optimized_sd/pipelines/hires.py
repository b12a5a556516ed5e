"""AUTOMATIC1111's hires fix: a txt2img first pass at the asked size, an upscale (of the latents by
`torch.nn.functional.interpolate`, or of the image by PIL and encoded again), then an img2img second pass
at the larger size. Each pass is its own pipeline call, so the memory plan (mode, VAE tiling) is made for
each size on its own: a 2x pass on a small card streams and tiles where the first pass did not need to.

The second pass is exactly our img2img from the upscaled latents: noise drawn from each image's own seed
at the new latent size (AUTOMATIC1111's `ImageRNG` made afresh for the hires pass), noised to
`strength` of the schedule and denoised from there."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from optimized_sd.errors import FieldError
from optimized_sd.pipelines.bounds import check_numbers
from optimized_sd.pipelines.core import Task, encode_image, run_task
from optimized_sd.pipelines.defaults import DEFAULT_HR_SCALE, DEFAULT_HR_STRENGTH, DEFAULT_HR_UPSCALER
from optimized_sd.pipelines.request import GenerationRequest, GenerationResult
from optimized_sd.pipelines.txt2img import TXT2IMG, Txt2Img
from optimized_sd.sampling import ProgressCallback, SamplingPlan, sampler_display_name, start_latents

if TYPE_CHECKING:
    from optimized_sd.pipelines.diffusion import StableDiffusion

MAX_HIRES_SIDE = 16384  # pixels: the library's limit on the second pass (the server's is its MAX_SIDE)


@dataclass(frozen=True)
class Upscaler:
    """One way to upscale between the passes: a latent mode of `F.interpolate`, or a PIL resample."""

    label: str  # AUTOMATIC1111's name (the API's and the metadata's)
    mode: str | None = None  # interpolate's mode for a latent upscaler
    antialias: bool = False
    resample: Image.Resampling | None = None  # PIL's filter for an image upscaler

    @property
    def latent(self) -> bool:
        return self.mode is not None


# our name (CLI, batch, Job) -> the upscaler; AUTOMATIC1111's `shared.latent_upscale_modes` and "None"/"Lanczos"/"Nearest"
UPSCALERS: dict[str, Upscaler] = {
    "latent": Upscaler("Latent", "bilinear"),
    "latent-antialiased": Upscaler("Latent (antialiased)", "bilinear", antialias=True),
    "latent-bicubic": Upscaler("Latent (bicubic)", "bicubic"),
    "latent-bicubic-antialiased": Upscaler("Latent (bicubic antialiased)", "bicubic", antialias=True),
    "latent-nearest": Upscaler("Latent (nearest)", "nearest"),
    "latent-nearest-exact": Upscaler("Latent (nearest-exact)", "nearest-exact"),
    "none": Upscaler("None", resample=Image.Resampling.LANCZOS),  # the first image resized, as AUTOMATIC1111's "None"
    "lanczos": Upscaler("Lanczos", resample=Image.Resampling.LANCZOS),
    "nearest": Upscaler("Nearest", resample=Image.Resampling.NEAREST),
}


def upscaler_named(name: str) -> str:
    """Our name for an upscaler given by ours or AUTOMATIC1111's (any case); FieldError naming hr_upscaler otherwise."""
    wanted = name.strip().lower()
    for ours, upscaler in UPSCALERS.items():
        if wanted in (ours, upscaler.label.lower()):
            return ours
    raise FieldError.about("hr_upscaler", f"{name!r} is unknown; use one of {', '.join(UPSCALERS)}")


@dataclass(frozen=True)
class HiresFix:
    """The second pass of one call (`GenerationRequest.hires`): by `scale`, or to `resize` (width, height),
    with `steps` (0: the first pass' count), `strength`, and `sampler`/`prompt`/`negative_prompt` (None: the first pass')."""

    scale: float = DEFAULT_HR_SCALE
    resize: tuple[int, int] | None = None
    upscaler: str = DEFAULT_HR_UPSCALER
    steps: int = 0
    strength: float = DEFAULT_HR_STRENGTH
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def job_fields(self) -> dict[str, object]:
        """This pass as the `Job`'s fields (`hires` and the hr_* ones, named hr_ + this class' field)."""
        return {"hires": True, **{f"hr_{f.name}": getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def of_job(cls, job: object) -> HiresFix:
        """The pass a `Job`'s hr_* fields describe (the inverse of `job_fields`)."""
        return cls(**{f.name: getattr(job, f"hr_{f.name}") for f in fields(cls)})

    def check(self, width: int | None = None, height: int | None = None, max_side: int = MAX_HIRES_SIDE) -> None:
        """The fields (FieldError naming the hr_* field), and the second pass' size when the first's is known."""
        check_numbers(hr_scale=self.scale, hr_steps=self.steps, hr_strength=self.strength)
        upscaler_named(self.upscaler)
        if self.resize is not None:
            for value in self.resize:
                if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
                    problem = f"{self.resize[0]}x{self.resize[1]}: each side must be a multiple of 8 (at least 8)"
                    raise FieldError.about("hr_resize", problem)
        if width is not None and height is not None:
            self.target(width, height, max_side=max_side)

    def target(self, width: int, height: int, multiple: int = 8, max_side: int = MAX_HIRES_SIDE) -> tuple[int, int, int, int]:
        """(upscale width, upscale height, final width, final height) in pixels, as AUTOMATIC1111's
        `calculate_target_resolution`: a scale floors to the VAE's multiple; a resize to another aspect
        covers it, keeping the first pass' aspect, and the excess is cropped off the middle afterwards."""
        if self.resize is None:
            up_w, up_h = (int(side * self.scale) // multiple * multiple for side in (width, height))
            final_w, final_h = up_w, up_h
            field = "hr_scale"
        else:
            final_w, final_h = self.resize
            if width / height < final_w / final_h:
                up_w, up_h = final_w, final_w * height // width
            else:
                up_w, up_h = final_h * width // height, final_h
            up_w, up_h = (side // multiple * multiple for side in (up_w, up_h))
            field = "hr_resize"
        if max(up_w, up_h) > max_side:
            problem = f"makes a {up_w}x{up_h} second pass from {width}x{height}, over the limit of {max_side} pixels a side"
            raise FieldError.about(field, problem)
        return up_w, up_h, final_w, final_h

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """AUTOMATIC1111's hires fields of the parameters text (its order; `Denoising strength` is the base field's)."""
        said = [("Hires resize", f"{self.resize[0]}x{self.resize[1]}") if self.resize else ("Hires upscale", f"{self.scale:g}")]
        if self.steps:
            said.append(("Hires steps", str(self.steps)))
        said.append(("Hires upscaler", UPSCALERS[upscaler_named(self.upscaler)].label))
        sampler = sampler_display_name(self.sampler, False) if self.sampler else None  # AUTOMATIC1111's name, as `Sampler`
        others = (("Hires sampler", sampler), ("Hires prompt", self.prompt), ("Hires negative prompt", self.negative_prompt))
        said += [(name, value) for name, value in others if value is not None]
        return tuple(said)


class HiresPass(Task):
    """The second pass: img2img from latents the first pass made (a latent upscaler's), or from images it
    made, encoded here, inside the second pass' own memory plan (an image upscaler's)."""

    name = "hires"

    def __init__(self, latents: Tensor | None = None, images: list[Image.Image] | None = None) -> None:
        self.latents, self.images = latents, images
        self.encodes_image = images is not None

    def strength(self, request: GenerationRequest) -> float:
        return request.strength

    def start_latents(self, pipe: StableDiffusion, request: GenerationRequest, plan: SamplingPlan, noise: Tensor, tiled: bool) -> Tensor:
        if self.images is not None:
            init = torch.cat([encode_image(pipe, image, 1, tiled) for image in self.images])
        else:
            assert self.latents is not None
            init = self.latents.to(noise.device, noise.dtype)
        return start_latents(plan, noise, init)

    def metadata_strength(self, request: GenerationRequest) -> float | None:
        return request.strength


class LatentsOnly(Txt2Img):
    """A first pass whose latents are upscaled: no VAE decode (AUTOMATIC1111 skips it too)."""

    decodes = False


LATENTS_ONLY = LatentsOnly()


def upscale_latents(latents: Tensor, size: tuple[int, int], upscaler: Upscaler) -> Tensor:
    """(B, C, h, w) -> (B, C, H, W) by AUTOMATIC1111's latent mode (`size` is (H, W) in latent pixels)."""
    return F.interpolate(latents, size=size, mode=upscaler.mode, antialias=upscaler.antialias)


def crop_middle(latents: Tensor, height: int, width: int) -> Tensor:
    """The middle height x width of (B, C, h, w): AUTOMATIC1111's truncation after a resize to another aspect."""
    top, left = (latents.shape[2] - height) // 2, (latents.shape[3] - width) // 2
    return latents[:, :, top : top + height, left : left + width]


def run_hires(pipe: StableDiffusion, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
    """The first pass, the upscale, and the second pass; the images are the second pass', the metadata
    the first pass' fields plus AUTOMATIC1111's hires fields."""
    hires = request.hires
    assert hires is not None
    if request.init_image is not None:
        raise FieldError.about("hires", "is a txt2img option: it cannot run with an init image")
    if not pipe.takes_init_image:  # said before the first pass, not as an init image error at the second
        raise FieldError.about("hires", f"cannot run on {pipe.config.family_name}, which has no img2img (the hires fix's second pass)")
    size = pipe.config.default_size
    hires.check(request.width or size, request.height or size)
    upscaler = UPSCALERS[upscaler_named(hires.upscaler)]
    first = run_task(pipe, TXT2IMG if not upscaler.latent else LATENTS_ONLY, replace(request, hires=None), progress)
    downscale = pipe.config.vae.downscale
    width, height = first.latents.shape[3] * downscale, first.latents.shape[2] * downscale
    up_w, up_h, final_w, final_h = hires.target(width, height, downscale)
    final = (final_h // downscale, final_w // downscale)
    if upscaler.latent:
        task = HiresPass(latents=crop_middle(upscale_latents(first.latents, (up_h // downscale, up_w // downscale), upscaler), *final))
    else:
        task = HiresPass(images=[crop_image(image.resize((up_w, up_h), upscaler.resample), final_w, final_h) for image in first.images])
    second_request = replace(
        request,
        hires=None,
        prompts=[hires.prompt] * len(request.prompts) if hires.prompt is not None else request.prompts,
        negative_prompt=hires.negative_prompt if hires.negative_prompt is not None else request.negative_prompt,
        sampler=hires.sampler or request.sampler,
        steps=hires.steps or request.steps,
        strength=hires.strength,
        seed=first.seeds[0],
        width=final_w,
        height=final_h,
    )
    second = run_task(pipe, task, second_request, progress)
    parameters = [replace(p, strength=hires.strength, extra=(*p.extra, *hires.metadata())) for p in first.parameters]
    return GenerationResult(second.images, second.seeds, parameters, second.latents)


def crop_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The middle width x height of an upscaled image (the pixel form of `crop_middle`)."""
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image if image.size == (width, height) else image.crop((left, top, left + width, top + height))

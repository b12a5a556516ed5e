"""A typed job: the one generation request that the CLI, the web UI, the API and the batch driver build
(prompts, seeds, sampling options, output policy), validated once (`Job.validate`) without the model,
then run batch by batch. A mistake is a `FieldError` naming the `Job` (or `InpaintOptions`/`OutputPolicy`)
field; each front end says it in its own words through its one mapping table.

Nothing here imports click or tqdm: callers bring their own progress display through `progress`."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from optimized_sd.errors import FieldError, UserError
from optimized_sd.memory.planner import format_bytes
from optimized_sd.pipelines.bounds import check_image_count, check_numbers
from optimized_sd.pipelines.controlnet import ControlNetSpec, check_controlnets, control_image
from optimized_sd.pipelines.defaults import (
    DEFAULT_DOWNSCALE,
    DEFAULT_ETA,
    DEFAULT_HR_SCALE,
    DEFAULT_HR_STRENGTH,
    DEFAULT_HR_UPSCALER,
    DEFAULT_IMAGE_FORMAT,
    DEFAULT_N_ITER,
    DEFAULT_N_SAMPLES,
    DEFAULT_REFINER_SWITCH,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
)
from optimized_sd.pipelines.diffusion import GenerationRequest, StableDiffusion
from optimized_sd.pipelines.hires import HiresFix
from optimized_sd.pipelines.images import load_init_image, open_image
from optimized_sd.pipelines.masks import InpaintOptions, prepare_region
from optimized_sd.pipelines.networks import lora_weights
from optimized_sd.pipelines.output import (
    ImageParameters,
    check_output_folder,
    check_report_path,
    make_grid,
    prompt_folder,
    save_encoded,
    save_image,
    write_report,
)
from optimized_sd.pipelines.previews import PREVIEW_FOLDER, PreviewWriter
from optimized_sd.pipelines.prompts import read_prompt_file
from optimized_sd.pipelines.request import check_refiner_switch, check_seeds, check_size
from optimized_sd.prompts.syntax import check_prompts
from optimized_sd.sampling import StepInfo, make_plan

IMAGE_FORMATS = ("png", "jpg")


@dataclass(frozen=True)
class OutputPolicy:
    """Where and how a job's images are written (optimizedSD's layout: `outdir/<prompt>/seed_<seed>_<n>.<fmt>`
    plus `outdir/grid_<n>.<fmt>`); `report_json` receives the per-stage time and memory report."""

    outdir: Path
    fmt: str = DEFAULT_IMAGE_FORMAT
    skip_save: bool = False
    skip_grid: bool = False
    n_rows: int = 0  # images per grid row; 0: n_samples
    report_json: Path | None = None
    preview_every: int = 0  # a preview of the first image every N sampling steps under outdir/previews/ (0: none)

    @property
    def writes_images(self) -> bool:
        return not (self.skip_save and self.skip_grid)


@dataclass(frozen=True)
class Job:
    """One user request: `prompts` (each repeated `n_samples` times and cut into batches of
    `n_samples`), or the prompts of `prompt_file` (one per line) instead; `n_iter` passes over them.
    Image i of a batch uses seed + i and the seed moves on by the batch size unless `fixed_code`.
    `init_image` (a path or a PIL image) makes it img2img, and with `inpaint` inpainting; height/width
    None: the model family's size for txt2img, the init image's size floored to 64 for img2img,
    `inpaint.generation_size` for inpainting (whose init image is never resized: the result has its size)."""

    prompts: tuple[str, ...] = ()
    prompt_file: Path | None = None
    negative_prompt: str = ""
    seed: int | None = None
    n_samples: int = DEFAULT_N_SAMPLES
    n_iter: int = DEFAULT_N_ITER
    fixed_code: bool = False
    steps: int | None = None  # None: the model family's (SD 50, Flux.1 dev 28, schnell 4)
    scale: float | None = None  # None: the family's (SD 7.5, Flux 1)
    eta: float = DEFAULT_ETA
    sampler: str | None = None  # None: the family's (SD plms, Flux euler)
    karras: bool = False
    schedule: str | None = None  # the k-samplers' sigma grid (sampling.SCHEDULE_TYPES); None: the default
    loras: tuple[str, ...] = ()  # 'FILE' or 'FILE:WEIGHT', besides the <lora:NAME:WEIGHT> tags in prompts
    refiner: Path | None = None  # an SDXL refiner finishing an SDXL base's sampling
    refiner_switch: float = DEFAULT_REFINER_SWITCH  # the share of the denoising the base runs
    height: int | None = None
    width: int | None = None
    latent_channels: int | None = None  # None: the model's
    downscale: int = DEFAULT_DOWNSCALE
    unet_batch: int | None = None
    init_image: Path | Image.Image | None = None
    strength: float = DEFAULT_STRENGTH
    inpaint: InpaintOptions | None = None
    max_image_pixels: int | None = None  # init images over this are refused (None: images.max_image_pixels)
    # hires fix (AUTOMATIC1111's two passes, txt2img): on with `hires`, else the hr_* fields are ignored (as AUTOMATIC1111)
    hires: bool = False
    hr_scale: float = DEFAULT_HR_SCALE
    hr_resize: tuple[int, int] | None = None  # (width, height) instead of hr_scale
    hr_upscaler: str = DEFAULT_HR_UPSCALER  # hires.UPSCALERS: ours or AUTOMATIC1111's name
    hr_steps: int = 0  # 0: the first pass' steps
    hr_strength: float = DEFAULT_HR_STRENGTH
    hr_sampler: str | None = None  # None: the first pass' sampler (and below, prompts)
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    guidance: float | None = None  # Flux.1 dev's distilled guidance (None: 3.5)
    max_sequence_length: int | None = None  # Flux.1's T5 tokens per prompt (None: dev 512, schnell 256)
    cfg_normalization: float | None = None  # Z-Image's CFG norm cap (None: 0, off); a warning on other families
    cfg_truncation: float | None = None  # Z-Image's CFG truncation (None: 1, never); a warning on other families
    # ControlNet units, in order (`pipelines.controlnet.control_specs` builds them from plain values).
    controlnets: tuple[ControlNetSpec, ...] = ()
    output: OutputPolicy = field(default_factory=lambda: OutputPolicy(Path("outputs")))

    def validate(self) -> None:
        """Everything that can be checked without the model, so a mistake costs no loading time: the one
        check every front end calls (FieldError naming the field, UserError where no one field is at fault)."""
        self.check_prompts_and_counts()
        self.check_output()
        self.check_sizes()
        self.check_sampling()
        self.check_files()
        if self.hires:
            self.check_hires()
        check_controlnets(self.controlnets)

    def check_prompts_and_counts(self) -> None:
        """Prompts given one way, the numbers in their bounds, and the seeds every image uses."""
        if not self.prompts and self.prompt_file is None:
            raise UserError("no prompt given")
        if self.prompts and self.prompt_file is not None:
            raise UserError("give prompts or a prompt file, not both")
        check_numbers(n_samples=self.n_samples, n_iter=self.n_iter)
        check_image_count(self.n_samples, self.n_iter)
        if self.unet_batch is not None and self.unet_batch < 1:
            raise FieldError.about("unet_batch", "must be at least 1")
        for name, value in (("latent_channels", self.latent_channels), ("downscale", self.downscale)):
            if value is not None and value < 1:
                raise FieldError.about(name, f"{value} must be at least 1")
        check_numbers(
            steps=self.steps, scale=self.scale, eta=self.eta, strength=self.strength,
            guidance=self.guidance, max_sequence_length=self.max_sequence_length,
            cfg_normalization=self.cfg_normalization, cfg_truncation=self.cfg_truncation,
        )  # fmt: skip
        images = self.n_samples if self.fixed_code else self.n_samples * self.n_iter * max(len(self.prompts), 1)
        check_seeds(self.seed, images)  # a prompt file's count is checked again by `check_batches`
        check_prompts(self.prompts, self.negative_prompt)

    def check_output(self) -> None:
        """What the output policy asks for: grid rows, format, previews, the report's path."""
        output = self.output
        if output.n_rows < 0:
            raise FieldError.about("n_rows", "must be 0 (one row per batch) or more")
        if output.fmt not in IMAGE_FORMATS:
            raise FieldError.about("fmt", f"{output.fmt!r} is unknown; use png or jpg")
        if output.preview_every < 0:
            raise FieldError.about("preview_every", f"{output.preview_every} must be 0 (no previews) or more")
        if output.report_json is not None:
            check_report_path(output.report_json)

    def check_sizes(self) -> None:
        """The image size, when given (one side alone is checked as a square)."""
        if self.height is not None and self.width is not None:
            check_size(self.height, self.width)
        elif self.height is not None or self.width is not None:
            given = self.height if self.height is not None else self.width
            check_size(given, given)

    def check_sampling(self) -> None:
        """The inpainting options and the sampler's plan (the family's default sampler is checked with the model)."""
        if self.inpaint is not None:
            if self.init_image is None:
                raise FieldError("init_image", "inpainting needs an init image", "is missing: inpainting needs one")
            self.inpaint.check()
        strength = self.strength if self.init_image is not None else 1.0
        if self.sampler is not None:
            make_plan(
                self.sampler, self.steps or DEFAULT_STEPS, strength=strength, eta=self.eta, karras=self.karras, schedule_type=self.schedule
            )

    def check_files(self) -> None:
        """The LoRA files and the refiner exist (read at load, but a missing one costs no loading time here)."""
        for path in lora_weights(self.loras):
            if not path.is_file():
                raise FieldError.about("loras", f"{path}: no such file")
        if self.refiner is not None:
            if not Path(self.refiner).exists():
                raise FieldError.about("refiner", f"{self.refiner}: no such file or folder")
            check_refiner_switch(self.refiner_switch)

    def hires_fix(self) -> HiresFix | None:
        """The second pass each batch runs (None without `hires`)."""
        return HiresFix.of_job(self) if self.hires else None

    def check_hires(self) -> None:
        """The hires fields, its sampler and prompts, and the second pass' size when the first's is given."""
        hires = self.hires_fix()
        assert hires is not None
        if self.init_image is not None:
            raise FieldError.about("hires", "is a txt2img option: it cannot run with an init image")
        sizes = (self.width, self.height) if self.width is not None and self.height is not None else ()
        hires.check(*sizes)
        sampler = self.hr_sampler or self.sampler
        if sampler is not None:  # the family's default sampler and steps are checked with the model
            make_plan(sampler, self.hr_steps or self.steps or DEFAULT_STEPS, strength=self.hr_strength, eta=self.eta,
                      karras=self.karras, schedule_type=self.schedule)  # fmt: skip
        check_prompts([p for p in (self.hr_prompt,) if p is not None], self.hr_negative_prompt or "")

    def check_batches(self, batches: list[list[str]]) -> None:
        """What needs the prompts (a prompt file's too): their syntax and bounds, the seeds they use, and their
        output folders (checked, not created: nothing is written before the model has run)."""
        prompts = list(dict.fromkeys(p for batch in batches for p in batch))
        check_prompts(prompts)
        images = self.n_samples if self.fixed_code else self.n_iter * sum(len(batch) for batch in batches)
        check_seeds(self.seed, images)
        policy = self.output
        if policy.writes_images:
            check_output_folder(policy.outdir)
        if policy.preview_every:
            check_output_folder(policy.outdir / PREVIEW_FOLDER)
        if not policy.skip_save:
            for prompt in prompts:
                check_output_folder(prompt_folder(policy.outdir, prompt))

    def open_init_image(self) -> Image.Image | None:
        """The init image as the pipeline takes it: resized to height/width for img2img, at its own size for
        inpainting (whose mask is checked against it here, so a bad mask costs no loading time)."""
        image = self.init_image
        if image is None or isinstance(image, Image.Image):
            return image
        if self.inpaint is None:
            return load_init_image(image, self.height, self.width, self.max_image_pixels)
        image = open_image(image, self.max_image_pixels)
        first = self.request([""], 0, image)
        prepare_region(image, (first.width, first.height), self.inpaint)
        return image

    def open_control_images(self) -> Job:
        """The job with its control images opened (a bad one costs no loading time)."""
        opened = tuple(replace(spec, image=control_image(spec, i, self.max_image_pixels)) for i, spec in enumerate(self.controlnets))
        return replace(self, controlnets=opened)

    def batches(self) -> list[list[str]]:
        """Prompt batches of n_samples: each prompt repeated and chunked (CompVis order;
        optimizedSD's sorting is dropped so batch i follows line i)."""
        prompts = list(self.prompts) if self.prompt_file is None else read_prompt_file(self.prompt_file)
        repeated = [p for p in prompts for _ in range(self.n_samples)]
        return [repeated[i : i + self.n_samples] for i in range(0, len(repeated), self.n_samples)]

    def request(self, prompts: list[str], seed: int, init_image: Image.Image | None) -> GenerationRequest:
        """The pipeline call for one batch."""
        default_width = default_height = None
        if self.inpaint is not None and init_image is not None:
            default_width, default_height = self.inpaint.generation_size(init_image.size)
        return GenerationRequest(
            prompts=prompts,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            scale=self.scale,
            eta=self.eta,
            sampler=self.sampler,
            karras=self.karras,
            schedule=self.schedule,
            loras=self.loras,
            refiner=self.refiner,
            refiner_switch=self.refiner_switch,
            seed=seed,
            height=self.height or default_height,  # None: the model family's size (the pipeline decides)
            width=self.width or default_width,
            latent_channels=self.latent_channels,
            guidance=self.guidance,
            max_sequence_length=self.max_sequence_length,
            cfg_normalization=self.cfg_normalization,
            cfg_truncation=self.cfg_truncation,
            downscale=self.downscale,
            unet_batch=self.unet_batch,
            init_image=init_image,
            strength=self.strength,
            inpaint=self.inpaint,
            hires=self.hires_fix(),
            controlnets=self.controlnets,
        )


@dataclass(frozen=True)
class JobStep:
    """What a job's progress callback is told: which batch, and the sampler's step within it."""

    batch: int  # 0-based, over n_iter passes of the prompt batches
    batches: int
    request: GenerationRequest
    info: StepInfo


@dataclass
class JobResult:
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[ImageParameters]
    written: list[Path]  # image, grid and side parameter files, in writing order
    first_seed: int
    pipeline: StableDiffusion  # the pipeline that ran it (a caller that passed a loader may keep it)


def memory_mode(memory: str, turbo: bool) -> str:
    """optimizedSD's `--turbo` is `--memory turbo`; both given must agree."""
    if turbo and memory not in ("auto", "turbo"):
        raise FieldError.about("turbo", f"is the turbo memory mode, which the memory mode {memory!r} contradicts; give one of them")
    return "turbo" if turbo else memory


def run_job(
    pipe: StableDiffusion | Callable[[], StableDiffusion],
    job: Job,
    progress: Callable[[JobStep], None] | None = None,
) -> JobResult:
    """Check the job, then generate every batch and write what the output policy asks for.

    `pipe` may be a loader, called only after every check that needs no model has passed (prompt
    file read, init image opened, output folder writable), so a mistake costs no loading time.
    An exception from `progress` (e.g. `errors.Interrupted`) stops the job; files already written stay."""
    job.validate()
    prompt_batches = job.batches()
    job.check_batches(prompt_batches)
    init_image = job.open_init_image()
    job = job.open_control_images()
    policy = job.output
    if not isinstance(pipe, StableDiffusion):
        pipe = pipe()
    seed = job.seed if job.seed is not None else random.randint(0, 2**32 - 1)
    first_seed = seed
    images: list[Image.Image] = []
    seeds: list[int] = []
    parameters: list[ImageParameters] = []
    written: list[Path] = []
    grid_text = ""  # the grid carries the metadata of the last batch's first image
    total = job.n_iter * len(prompt_batches)
    previews = PreviewWriter(policy.outdir / PREVIEW_FOLDER, policy.preview_every) if policy.preview_every else None
    for index in range(total):
        request = job.request(prompt_batches[index % len(prompt_batches)], seed, init_image)
        result = pipe.generate(request, step_callback(pipe, request, (index, total), progress, previews))
        for image, used_seed, image_parameters, prompt in zip(result.images, result.seeds, result.parameters, request.prompts):
            if not policy.skip_save:
                written.extend(save_image(image, prompt_folder(policy.outdir, prompt), used_seed, policy.fmt, image_parameters))
        images.extend(result.images)
        seeds.extend(result.seeds)
        parameters.extend(result.parameters)
        grid_text = result.parameters[0].text()
        if not job.fixed_code:
            seed += len(request.prompts)
    if not policy.skip_grid and len(images) > 1:
        grid = make_grid(images, policy.n_rows or job.n_samples)
        written.extend(save_encoded(grid, policy.outdir, "grid", policy.fmt, grid_text, 0))
    if policy.report_json is not None:
        report = pipe.meter.as_dict(memory_placement(pipe))
        write_report(policy.report_json, json.dumps(report, indent=2).encode())
    return JobResult(images, seeds, parameters, written, first_seed, pipe)


def step_callback(
    pipe: StableDiffusion,
    request: GenerationRequest,
    batch: tuple[int, int],  # (this batch, how many)
    progress: Callable[[JobStep], None] | None,
    previews: PreviewWriter | None,
) -> Callable[[StepInfo], None] | None:
    """What one batch's sampler calls after each step: the preview writer and the job's progress (None: neither)."""
    if progress is None and previews is None:
        return None

    def callback(info: StepInfo) -> None:
        if previews is not None:
            previews(pipe.preview, request, info)
        if progress is not None:
            progress(JobStep(*batch, request, info))

    return callback


def memory_placement(pipe: StableDiffusion) -> dict[str, Any]:
    """Where the last call placed the model and its neighbours, for `--report-json`."""
    placed: dict[str, Any] = {"mode": pipe.mode, "plan": pipe.plan.__dict__ if pipe.plan else None}
    for name, session in pipe.memory.sessions.items():  # a refiner: its stages are in the same meter, prefixed `refiner_`
        placed[name] = {"mode": session.mode, "plan": session.plan.__dict__ if session.plan else None}
    sides = pipe.memory.sides()
    if sides:  # side networks placed by the same plan (ControlNets), and what left early
        placed["components"] = {c.name: {"released": list(c.released)} for c in sides}
    return placed


def describe_memory(pipe: StableDiffusion) -> str:
    """'<mode> [copying up to N of blocks ahead] on <device>[, <kind> weights][, refiner <mode>]': how the
    last call ran (the refiner's mode when one is loaded: its plan is its own)."""
    ahead = pipe.engine.lookahead_bytes if pipe.engine is not None and pipe.engine.prefetch_enabled else 0
    mode = f"{pipe.mode} (copying up to {format_bytes(ahead)} of blocks ahead)" if ahead else pipe.mode
    weights = f", {pipe.storage.kind} weights" if pipe.storage.stored else ""
    refiner = f", refiner {pipe.refiner.mode}" if pipe.refiner is not None and pipe.refiner.mode is not None else ""
    return f"{mode} on {pipe.device}{weights}{refiner}"


__all__ = ["Job", "JobResult", "JobStep", "OutputPolicy", "describe_memory", "memory_mode", "run_job"]

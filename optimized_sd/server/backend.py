"""The server's one adapter to the pipeline: what a UI form or an API call asks for (`GenerationSpec`,
in AUTOMATIC1111's vocabulary) becomes the one request, a pipeline `Job` (`spec_job`), validated by
`Job.validate` like every other front end's; its progress becomes `Job.report` calls  and its results
become PNGs carrying AUTOMATIC1111's `parameters` text. No other server module calls the pipeline."""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from PIL import Image
from torch import Tensor

from optimized_sd.errors import FieldError, Interrupted, UserError
from optimized_sd.families.flux import FLUX_DEV
from optimized_sd.memory.planner import MODES, parse_bytes
from optimized_sd.pipelines.controlnet import ControlNetSpec
from optimized_sd.pipelines.defaults import DEFAULT_REFINER_SWITCH, DEFAULT_STRENGTH
from optimized_sd.pipelines.diffusion import StableDiffusion
from optimized_sd.pipelines.hires import HiresFix
from optimized_sd.pipelines.job import Job as PipelineJob
from optimized_sd.pipelines.job import JobStep, OutputPolicy, run_job
from optimized_sd.pipelines.load_options import LoadOptions
from optimized_sd.pipelines.masks import InpaintOptions, check_mask, fit_mask, load_mask
from optimized_sd.pipelines.output import ImageParameters, encode
from optimized_sd.pipelines.request import INPAINTING_UNET_CHANNELS
from optimized_sd.sampling import SAMPLERS, sampler_display_name
from optimized_sd.server.catalog import ModelCatalog, ModelEntry
from optimized_sd.server.jobs import Job
from optimized_sd.server.preview import PreviewDecoders, approx_folders

log = logging.getLogger("optimized_sd")

MEMORY_CHOICES = ("auto", *MODES)
MAX_BATCH = 16
MAX_SIDE = 4096
SEED_LIMIT = 2**32  # seeds are drawn below this, as the CLI does
# AUTOMATIC1111's `inpainting_fill` ("Masked content") values -> our `InpaintOptions.masked_content`.
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent-noise", 3: "latent-nothing"}
# The GenerationSpec fields whose default a family may set in place of AUTOMATIC1111's (`Defaults.a1111`).
FAMILY_DEFAULTED = ("steps", "cfg_scale", "width", "height")
# Request field (a `Job`, `InpaintOptions` or `OutputPolicy` field) -> AUTOMATIC1111's name for it in the API
# (and in GenerationSpec); None: the API does not expose it. A FieldError is said with these names (`api_error`).
API_FIELDS: dict[str, str | None] = {
    "prompts": "prompt", "prompt_file": None, "negative_prompt": "negative_prompt", "seed": "seed", "n_samples": "batch_size",
    "n_iter": "n_iter", "fixed_code": None, "steps": "steps", "scale": "cfg_scale", "eta": "eta", "sampler": "sampler_name",
    "karras": "scheduler", "schedule": "scheduler", "loras": None,  # LoRAs come as <lora:NAME:WEIGHT> in the prompt
    "refiner": "refiner_checkpoint", "refiner_switch": "refiner_switch_at", "height": "height", "width": "width",
    "latent_channels": None, "downscale": None, "unet_batch": None, "init_image": "init_images", "strength": "denoising_strength",
    "inpaint": None, "max_image_pixels": None,  # the server's limits decide (`service.limits`)
    "controlnets": "alwayson_scripts.controlnet.args",  # sd-webui-controlnet's units (the API names each unit's field)
    "output": None, "outdir": None, "fmt": None, "skip_save": None, "skip_grid": None, "n_rows": None, "report_json": None,
    "preview_every": None,  # live previews: the CLI writes files; the server shows them (VAE-approx/)
    "mask": "mask", "invert_mask": "inpainting_mask_invert", "mask_blur": "mask_blur", "area": "inpaint_full_res",
    "padding": "inpaint_full_res_padding", "outpaint": None, "masked_content": "inpainting_fill",
    "hires": "enable_hr", "hr_scale": "hr_scale", "hr_resize": "hr_resize_x", "hr_upscaler": "hr_upscaler",
    "hr_steps": "hr_second_pass_steps", "hr_strength": "denoising_strength", "hr_sampler": "hr_sampler_name", "hr_prompt": "hr_prompt",
    "hr_negative_prompt": "hr_negative_prompt",
    "guidance": "distilled_cfg_scale",  # Forge's name for Flux.1 dev's distilled guidance
    "max_sequence_length": None,  # Forge has no field for it: the CLI, batch lines and the library
    "cfg_normalization": "cfg_normalization", "cfg_truncation": "cfg_truncation",  # Z-Image's, by diffusers' names
}  # fmt: skip


LOAD_OPTION_FIELDS = frozenset(option.name for option in fields(LoadOptions))


def api_error(error: FieldError) -> FieldError:
    """`error` said with AUTOMATIC1111's name of its field (as it is when the name is already the API's); a load
    option is not a request field but how the server was started: it is said as its `serve` flag."""
    if error.field in LOAD_OPTION_FIELDS and error.field not in API_FIELDS:
        flag = "--" + error.field.replace("_", "-")  # serve takes every load option as a flag (tests/test_request_fields.py)
        return FieldError(error.field, error.named(flag), error.problem)
    name = API_FIELDS.get(error.field)
    return error if name is None or name == error.field else FieldError(name, error.named(name), error.problem)


@dataclass(frozen=True)
class GenerationSpec:
    """One generation as the front ends ask for it: txt2img without `init_image`, img2img with it,
    inpainting with a `mask` too. `sampler` is our name (see `resolve_sampler` for AUTOMATIC1111's)."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "euler_a"
    karras: bool = False
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1  # -1: random
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    eta: float = 0.0  # DDIM only
    init_image: Image.Image | None = None
    strength: float = DEFAULT_STRENGTH
    mask: Image.Image | None = None  # any mode `masks.load_mask` reads; white is repainted
    mask_blur: float = 4
    inpainting_fill: int = 1  # see INPAINTING_FILL
    inpaint_full_res: bool = False  # True: "only masked" (InpaintOptions.area "masked")
    inpaint_full_res_padding: int = 32
    invert_mask: bool = False
    refiner: Path | None = None  # an SDXL refiner (a catalog entry's path, never one from a request)
    refiner_switch: float = DEFAULT_REFINER_SWITCH  # the share of the denoising the base runs
    memory: str | None = None  # None: the server's --memory
    vram_budget: str | None = None  # None: the server's --vram-budget
    hires: HiresFix | None = None  # txt2img: AUTOMATIC1111's hires fix (enable_hr and its hr_* fields)
    controlnets: tuple[ControlNetSpec, ...] = ()  # files from the catalog's ControlNet/ folder, never a request's path
    guidance: float | None = None  # Forge's distilled_cfg_scale (Flux.1 dev; None: its default, 3.5)
    cfg_normalization: float | None = None  # Z-Image's (None: off)
    cfg_truncation: float | None = None  # Z-Image's (None: never)
    # The FAMILY_DEFAULTED fields the request left out: the loaded family's values replace them when its record
    # does not take AUTOMATIC1111's (`Backend.with_family_defaults`).
    defaulted: frozenset[str] = frozenset()

    @property
    def task(self) -> str:
        return "inpaint" if self.mask is not None else "img2img" if self.init_image is not None else "txt2img"


@dataclass
class Generated:
    """What a job made: images with their seeds, parameters and PNG bytes (metadata included)."""

    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    parameters: list[ImageParameters] = field(default_factory=list)
    pngs: list[bytes] = field(default_factory=list)
    seed: int = 0
    interrupted: bool = False
    steps_done: int = 0
    mode: str | None = None
    memory_report: str = ""
    memory_stages: dict = field(default_factory=dict)
    model_name: str = ""
    model_hash: str = ""
    inpainting_conditioning: bool = False  # a 9-channel inpainting UNet saw the mask
    spec: GenerationSpec | None = None  # what ran: the request with the family's defaults filled in


def sampler_aliases(ours: str) -> list[str]:
    """Other names a client may use for a sampler: ours and k-diffusion's `k_` form (k-samplers only)."""
    return [ours] if ours in ("ddim", "plms") else [ours, f"k_{ours}"]


def resolve_sampler(name: str, scheduler: str | None = None) -> tuple[str, bool]:
    """AUTOMATIC1111's sampler name (or an alias: ours, `k_euler_a`, "DPM++ 2M Karras") and
    scheduler -> (our sampler, karras). FieldError naming the field otherwise."""
    wanted = name.strip()
    karras = False
    if wanted.lower().endswith(" karras"):
        wanted, karras = wanted[: -len(" karras")], True
    key = wanted.lower()
    for ours in SAMPLERS:
        if key == sampler_display_name(ours, False).lower() or key in sampler_aliases(ours):
            break
    else:
        shown = ", ".join(sampler_display_name(s, False) for s in SAMPLERS)
        raise FieldError("sampler_name", f"unknown sampler {name!r}; choose one of: {shown}")
    schedule = (scheduler or "automatic").strip().lower()
    if schedule == "karras":
        karras = True
    elif schedule not in ("automatic", "uniform", ""):
        raise FieldError("scheduler", f"unknown scheduler {scheduler!r}; this server offers Automatic and Karras")
    return ours, karras


def check_spec(spec: GenerationSpec) -> None:
    """Everything that can be checked before queueing, so a mistake comes back at once: the server's own
    limits (tighter than the library's: one server answers many clients), then `Job.validate`. A mistake
    is a FieldError naming the request field; the API and the UI say it in their words."""
    check_server_limits(spec)
    check_settings(spec)
    if spec.mask is not None:
        if spec.init_image is None:
            raise FieldError("init_image", "inpainting needs the image to repaint in init_images", "is missing: inpainting needs one")
        if spec.inpainting_fill not in INPAINTING_FILL:
            offered = ", ".join(f"{value} ({name})" for value, name in INPAINTING_FILL.items())
            raise FieldError.about("masked_content", f"{spec.inpainting_fill} is unknown; use {offered}")
    if spec.hires is not None:
        spec.hires.check(spec.width, spec.height, max_side=MAX_SIDE)
    spec_job(spec, spec.init_image, inpaint_options(spec, spec.mask)).validate()
    if spec.mask is not None:
        check_mask_paints(spec)


def check_server_limits(spec: GenerationSpec) -> None:
    """The prompt's type and the sizes, batch and seed within this server's limits."""
    if not isinstance(spec.prompt, str):
        raise FieldError.about("prompts", "must be text")
    for name in ("width", "height"):
        value = getattr(spec, name)
        if not 8 <= value <= MAX_SIDE:
            raise FieldError.about(name, f"must be from 8 to {MAX_SIDE} pixels, got {value}")
    for name, value, limit in (("n_samples", spec.batch_size, MAX_BATCH), ("n_iter", spec.n_iter, 100)):
        if not 1 <= value <= limit:
            raise FieldError.about(name, f"must be from 1 to {limit}, got {value}")
    if not -1 <= spec.seed < SEED_LIMIT:
        raise FieldError.about("seed", f"must be -1 (random) or from 0 to {SEED_LIMIT - 1}, got {spec.seed}")


def check_settings(spec: GenerationSpec) -> None:
    """The server-side settings a request may name: the memory mode and the VRAM budget."""
    if spec.memory is not None and spec.memory not in MEMORY_CHOICES:
        raise FieldError("memory", f"unknown memory mode {spec.memory!r}; choose one of {', '.join(MEMORY_CHOICES)}")
    if spec.vram_budget:
        try:
            parse_bytes(spec.vram_budget)
        except UserError as error:
            raise FieldError("vram_budget", str(error)) from None


def check_mask_paints(spec: GenerationSpec) -> None:
    """A mask with something to repaint (once inverted, if asked)."""
    assert spec.mask is not None
    try:
        check_mask(fit_mask(load_mask(spec.mask), spec.mask.size, spec.invert_mask))
    except UserError:
        inverted = " once inverted (inpainting_mask_invert)" if spec.invert_mask else ""
        problem = f"is all black{inverted}: nothing to repaint (white marks what is repainted)"
        raise FieldError("mask", f"the mask {problem}", problem) from None


def inpaint_options(spec: GenerationSpec, mask: Image.Image | None) -> InpaintOptions | None:
    """The spec's inpainting fields as the request's InpaintOptions (None without a mask)."""
    if mask is None:
        return None
    return InpaintOptions(
        mask=mask,
        invert_mask=spec.invert_mask,
        mask_blur=spec.mask_blur,
        area="masked" if spec.inpaint_full_res else "whole",
        padding=spec.inpaint_full_res_padding,
        masked_content=INPAINTING_FILL[spec.inpainting_fill],
    )


def spec_job(spec: GenerationSpec, init_image: Image.Image | None, inpaint: InpaintOptions | None) -> PipelineJob:
    """The one request a spec asks for, writing no files (seed -1 stays None: `generate` draws it)."""
    return PipelineJob(
        prompts=(spec.prompt,),
        negative_prompt=spec.negative_prompt,
        seed=spec.seed if spec.seed >= 0 else None,
        n_samples=spec.batch_size,
        n_iter=spec.n_iter,
        steps=spec.steps,
        scale=spec.cfg_scale,
        eta=spec.eta,
        sampler=spec.sampler,
        karras=spec.karras,
        height=spec.height,
        width=spec.width,
        init_image=init_image,
        strength=spec.strength,
        inpaint=inpaint,
        refiner=spec.refiner,
        refiner_switch=spec.refiner_switch,
        controlnets=spec.controlnets,
        guidance=spec.guidance,
        cfg_normalization=spec.cfg_normalization,
        cfg_truncation=spec.cfg_truncation,
        **(spec.hires.job_fields() if spec.hires is not None else {}),
        output=OutputPolicy(Path("."), skip_save=True, skip_grid=True),  # the front ends send the PNGs
    )


class Backend:
    """The loaded model and the calls made on it. Used from the job worker thread only (one job at
    a time), except for the read-only properties."""

    def __init__(self, catalog: ModelCatalog, options: LoadOptions) -> None:
        self.catalog = catalog
        self.options = options
        self.pipe: StableDiffusion | None = None
        self.current: ModelEntry | None = None
        self.last: Generated | None = None
        self.hashes: dict[Path, str] = {}
        self._lock = threading.Lock()  # guards pipe swaps against readers of `current`
        self.previews = PreviewDecoders(approx_folders(catalog.models_dir, catalog.ckpt))

    def load(self, entry: ModelEntry) -> None:
        """Open `entry` (a catalog entry: never a path from a request), releasing the old model."""
        if self.current == entry and self.pipe is not None:
            return
        pipe = self.options.load(entry.path)
        with self._lock:
            old, self.pipe, self.current = self.pipe, pipe, entry
        if old is not None:
            old.close()
        log.info("model %s loaded", entry.title)

    @property
    def distilled_guidance(self) -> bool:
        """Whether the loaded model takes a distilled guidance value (Flux.1 dev: Forge's "Distilled CFG scale")."""
        pipe = self.pipe
        return pipe is not None and pipe.config.family == FLUX_DEV

    def family_defaults(self) -> dict[str, float] | None:
        """The loaded model's own steps, cfg_scale, width and height, when its family's record wants them for a
        request that leaves them out; None when it takes AUTOMATIC1111's (SD) or no model is loaded."""
        pipe = self.pipe
        if pipe is None or pipe.config.record.defaults.a1111:
            return None
        defaults, size = pipe.config.record.defaults, pipe.config.default_size
        return {"steps": defaults.steps, "cfg_scale": defaults.scale, "width": size, "height": size}

    def with_family_defaults(self, spec: GenerationSpec) -> GenerationSpec:
        """`spec` with the fields it left out set to the loaded family's defaults (unchanged for SD)."""
        own = self.family_defaults()
        if own is None or not spec.defaulted:
            return spec
        return replace(spec, **{name: own[name] for name in spec.defaulted})

    def preview(self, latents: Tensor) -> Image.Image:
        """A running job's latents as a picture: a TAESD from `VAE-approx/` for the loaded family, else the projection."""
        pipe = self.pipe
        return self.previews.image(latents, pipe.config if pipe is not None else None)

    def close(self) -> None:
        with self._lock:
            pipe, self.pipe = self.pipe, None
        if pipe is not None:
            pipe.close()

    def known_hash(self, entry: ModelEntry) -> str | None:
        """AUTOMATIC1111's short hash of a model, once a generation with it has computed it."""
        return self.hashes.get(entry.path)

    def apply_memory(self, spec: GenerationSpec) -> None:
        """The call's memory mode and budget (the server's flags unless the request names its own)."""
        assert self.pipe is not None
        session = self.pipe.memory
        session.requested = spec.memory or self.options.memory
        budget = spec.vram_budget or self.options.vram_budget
        session.budget = parse_bytes(budget) if budget else None

    @staticmethod
    def prepare_init_image(spec: GenerationSpec) -> tuple[Image.Image | None, InpaintOptions | None]:
        """The init image as RGB, and the inpainting options when the spec has a mask.

        As AUTOMATIC1111: img2img and whole-picture inpainting resize the image (and the mask with it)
        to the requested size ("just resize", resize mode 0), so the result has that size; "only
        masked" keeps the image's own size and generates the mask's padded box at the requested size.
        A mask of another size than the uploaded image is first fitted to it, with a warning."""
        if spec.init_image is None:
            return None, None
        image = spec.init_image.convert("RGB")
        mask = fit_mask(load_mask(spec.mask), image.size) if spec.mask is not None else None
        size = (spec.width, spec.height)
        if image.size != size and not (mask is not None and spec.inpaint_full_res):
            image = image.resize(size, Image.LANCZOS)
            mask = mask.resize(size, Image.LANCZOS) if mask is not None else None
        return image, inpaint_options(spec, mask)

    def generate(self, spec: GenerationSpec, job: Job) -> Generated:
        """Run `spec` as a pipeline `Job` of `n_iter` batches of `batch_size`, writing no files; the
        pipeline's progress feeds `job` (which raises `Interrupted` once a cancel is asked for)."""
        pipe = self.pipe
        assert pipe is not None, "no model loaded"
        spec = self.with_family_defaults(spec)
        check_spec(spec)
        self.apply_memory(spec)
        init_image, inpaint = self.prepare_init_image(spec)
        pipeline_job = spec_job(spec, init_image, inpaint)
        if pipeline_job.seed is None:
            pipeline_job = replace(pipeline_job, seed=random.randrange(SEED_LIMIT))

        def progress(step: JobStep) -> None:
            if step.info.step == 0:
                job.begin_batch(step.batch, step.batches)
            job.report(step.info.step, step.info.total, step.info.denoised)  # previews show the x0 estimate

        out = Generated(seed=pipeline_job.seed, model_name=self.current.model_name if self.current else "", spec=spec)
        try:
            result = run_job(pipe, pipeline_job, progress)
        except Interrupted:
            out.interrupted = True  # AUTOMATIC1111 keeps finished batches; a pipeline job returns all or nothing
        else:
            out.images, out.seeds, out.parameters = result.images, result.seeds, result.parameters
            out.pngs = [encode(image, "png", p.text()) for image, p in zip(result.images, result.parameters, strict=True)]
        out.steps_done = job.snapshot().step
        out.mode = pipe.mode
        out.memory_stages = pipe.meter.summary()
        out.memory_report = pipe.meter.format_table(out.memory_stages)  # the last pipeline call (the last batch)
        out.model_hash = pipe.model_hash()
        out.inpainting_conditioning = inpaint is not None and pipe.config.unet.in_channels == INPAINTING_UNET_CHANNELS
        if self.current is not None:
            self.hashes[self.current.path] = out.model_hash
        self.last = out
        return out

"""`optimized-sd` command line: parse flags, build a Job, run it with a progress bar, print. No logic.

Two tables say the CLI's words: CLI_FLAGS (request field -> flag) and LOAD_FLAGS (LoadOptions field -> flag);
a library FieldError names a request field, and `main` prints it with the field's flag."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from optimized_sd.errors import FieldError, Interrupted, UserError
from optimized_sd.pipelines import defaults
from optimized_sd.pipelines.load_options import LoadOptions

if TYPE_CHECKING:
    from optimized_sd.batch import LoadSpec
    from optimized_sd.batch.driver import WorkerPool

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"


# Request field (a `Job`, `OutputPolicy` or `InpaintOptions` field) -> the flag that sets it; None: no flag.
CLI_FLAGS: dict[str, str | None] = {
    "prompts": "--prompt", "prompt_file": "--from-file", "negative_prompt": "--negative-prompt", "seed": "--seed",
    "n_samples": "--n_samples", "n_iter": "--n_iter", "fixed_code": "--fixed_code", "steps": "--ddim_steps", "scale": "--scale",
    "eta": "--ddim_eta", "sampler": "--sampler", "karras": "--karras", "schedule": "--schedule", "loras": "--lora",
    "refiner": "--refiner", "refiner_switch": "--refiner-switch", "height": "--H", "width": "--W", "latent_channels": "--C",
    "downscale": "--f", "unet_batch": "--unet_bs", "init_image": "--init-img", "strength": "--strength",
    "max_image_pixels": "--max-image-pixels", "inpaint": None,  # the inpaint command's own flags, below
    "output": None, "outdir": "--outdir", "fmt": "--format", "skip_save": "--skip_save", "skip_grid": "--skip_grid",
    "n_rows": "--n_rows", "report_json": "--report-json", "preview_every": "--preview-every",
    "mask": "--mask", "invert_mask": "--invert-mask", "mask_blur": "--mask-blur", "area": "--inpaint-area", "padding": "--padding",
    "outpaint": "--outpaint", "masked_content": "--masked-content",
    "hires": None,  # on with --hr-scale or --hr-resize (txt2img)
    "hr_scale": "--hr-scale", "hr_resize": "--hr-resize", "hr_upscaler": "--hr-upscaler", "hr_steps": "--hr-steps",
    "hr_strength": "--hr-strength", "hr_sampler": "--hr-sampler", "hr_prompt": "--hr-prompt", "hr_negative_prompt": "--hr-negative-prompt",
    "guidance": "--guidance", "max_sequence_length": "--max-sequence-length",
    "cfg_normalization": "--cfg-normalization", "cfg_truncation": "--cfg-truncation",
    "controlnets": "--controlnet",  # with --control-image and the --control-* settings (`CONTROL_SETTINGS`)
}  # fmt: skip
# ControlNetSpec field -> its flag: given once it applies to every unit, or once per unit in --controlnet order.
CONTROL_SETTINGS = {
    "start": "--control-start", "end": "--control-end", "mode": "--control-mode", "resize": "--control-resize",
    "preprocessor": "--control-preprocessor", "threshold_a": "--control-threshold-a", "threshold_b": "--control-threshold-b",
}  # fmt: skip
HIRES_FIELDS = ("hr_scale", "hr_resize", "hr_upscaler", "hr_steps", "hr_strength", "hr_sampler", "hr_prompt", "hr_negative_prompt")
OUTPUT_FIELDS = ("outdir", "fmt", "skip_save", "skip_grid", "n_rows", "report_json", "preview_every")
# LoadOptions field -> its flag (the generate commands, batch and serve all take them: `load_options`); None: not exposed.
LOAD_FLAGS: dict[str, str | None] = {
    "config": "--config", "ema": "--ema", "vae": "--vae", "prediction": "--prediction", "device": "--device",
    "precision": "--precision", "memory": "--memory", "vram_budget": "--vram-budget", "ram_budget": "--ram-budget",
    "attention": "--attention", "vae_tiling": "--vae-tiling", "tokenizer": "--tokenizer", "lora_dir": "--lora-dir", "embeddings_dir": "--embeddings-dir",
    "weights": "--weights", "int8_matmul": None, "channels_last": None, "text_encoders": "--text-encoder",
    "distilled": "--distilled",
    "parts_from": "--parts-from",
    "preview_decoder": None,  # the generate commands' --preview/--preview-decoder/--vae choose it (`preview_decoder_path`)
}  # fmt: skip
# LoadOptions fields the generate commands derive from a flag of another name (not set by `load_options`).
DERIVED_FLAGS = {"preview_decoder": "--preview-decoder"}
# What the commands take besides request fields and load options, as the library's FieldErrors name it -> its flag.
COMMAND_FLAGS = {
    "checkpoint": "--ckpt", "preview": "--preview", "turbo": "--turbo", "max_image_pixels": "--max-image-pixels",
    "ray": "--ray", "workers": "--workers", "gpus_per_worker": "--gpus-per-worker",
}  # fmt: skip
LOADING = LoadOptions()  # the defaults the load flags show


def flag_words(error: FieldError) -> str:
    """A FieldError said with the flag of its field (as the library said it when no flag sets the field)."""
    flag = CLI_FLAGS.get(error.field) or LOAD_FLAGS.get(error.field) or DERIVED_FLAGS.get(error.field) or COMMAND_FLAGS.get(error.field)
    return error.named(flag) if flag else str(error)


def apply_options(options: list[Callable]) -> Callable:
    """Several click options as one decorator, in the order given."""

    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def load_options(memory_help: str = "auto, full, turbo, split or stream.") -> Callable:
    """The model-loading flags (every LoadOptions field LOAD_FLAGS exposes), shared by the generate commands,
    batch and serve."""
    path = click.Path(path_type=Path)
    return apply_options([
        click.option("--config", type=path, help="JSON model config overriding the one read off the weights."),
        click.option("--tokenizer", type=path, multiple=True,
                     help="Tokenizer folder: CLIP's (vocab.json and merges.txt, or tokenizer.json); for Flux also T5's (spiece.model); repeatable."),
        click.option("--text-encoder", "text_encoders", type=path, multiple=True, default=LOADING.text_encoders,
                     help="A text tower file for a checkpoint without it (Flux: clip_l.safetensors, t5xxl_*.safetensors; an SD/SDXL GGUF UNet: clip_l, clip_g); repeatable."),
        click.option("--parts-from", "parts_from", type=path,
                     help="A whole checkpoint of the same family giving a denoiser-only file (a GGUF) its VAE and text encoders."),
        click.option("--distilled/--base", "distilled", default=None,
                     help="Flux.2 klein: the step-distilled model (4 steps, no CFG) or the base (CFG); default: from the file or folder name."),
        click.option("--ema", is_flag=True, help="Use the checkpoint's EMA UNet weights."),
        click.option("--vae", type=path, help="A separate VAE file (LDM or diffusers keys) replacing the checkpoint's, or a TAESD decoder (taesd_decoder.*) for fast decodes."),
        click.option("--prediction", default=LOADING.prediction, show_default=True, help="auto, eps or v: what the UNet predicts (auto: what the file says, else the family's default)."),
        click.option("--device", help="cuda, cuda:N, cpu or mps (default: the best available)."),
        click.option("--precision", default=LOADING.precision, show_default=True, help="autocast (fp16 on GPU, fp32 on CPU), full (fp32), fp16 or bf16."),
        click.option("--memory", default=LOADING.memory, show_default=True, help=memory_help),
        click.option("--weights", help="Store the UNet/VAE Linear and Conv2d weights as fp16, bf16, fp8 or int8 (default: the compute dtype)."),
        click.option("--vram-budget", "vram_budget", help="Plan for this much device memory, e.g. 1.5GB."),
        click.option("--ram-budget", "ram_budget",
                     help="Host RAM for the weights off the device, e.g. 8GB, or auto (what is available): pinned copy, pinned ring, pageable or memory-mapped per part."),
        click.option("--attention", default=LOADING.attention, show_default=True, help="sdpa, xformers, sliced or naive."),
        click.option("--vae-tiling", "vae_tiling", default=LOADING.vae_tiling, show_default=True, help="auto, on or off."),
        click.option("--lora-dir", "lora_dir", type=path, default=LOADING.lora_dir, show_default=True, help="Where <lora:NAME:WEIGHT> in a prompt finds NAME.safetensors."),
        click.option("--embeddings-dir", "embeddings_dir", type=path, default=LOADING.embeddings_dir, show_default=True, help="Textual-inversion files, used by writing their file name in a prompt."),
    ])  # fmt: skip


def load_options_from(flags: dict, memory: str | None = None) -> LoadOptions:
    """The load flags as LoadOptions (`memory`: the mode after --turbo is folded in)."""
    given = {name: flags[name] for name, flag in LOAD_FLAGS.items() if flag is not None}
    return LoadOptions(**{**given, "memory": memory if memory is not None else flags["memory"]})


def generation_options(default_outdir: str, default_size: int | None) -> Callable:
    """The flags txt2img and img2img share (optimizedSD's names), applied as one decorator."""
    size_help = "pixels (multiple of 8); default: " + (
        "the family's (512 SD 1.x and SD 2.x base, 768 SD 2.x v, 1024 SDXL)" if default_size is None and "txt2img" in default_outdir
        else "the init image's size floored to 64"
    )
    options = [
        click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Prompt; 'a:0.25 b:0.75' mixes weighted subprompts."),
        click.option("--from-file", "prompt_file", type=click.Path(path_type=Path), help="Read prompts from a file, one per line."),
        click.option("--negative-prompt", "negative_prompt", default="", help="What to steer away from (the unconditional prompt)."),
        click.option("--outdir", type=click.Path(path_type=Path), default=default_outdir, show_default=True, help="Output root folder."),
        click.option("--ckpt", type=click.Path(path_type=Path), default=DEFAULT_CKPT, show_default=True, help="Checkpoint: .ckpt, .safetensors or a diffusers folder."),
        click.option("--refiner", type=click.Path(path_type=Path),
                     help="An SDXL refiner (file or diffusers folder) that finishes an SDXL base's sampling."),
        click.option("--refiner-switch", "refiner_switch", type=float, default=defaults.DEFAULT_REFINER_SWITCH, show_default=True,
                     help="Share of the denoising the base runs before the refiner takes over (by timestep, as AUTOMATIC1111)."),
        click.option("--H", "height", type=int, default=default_size, help=f"Image height in {size_help}."),
        click.option("--W", "width", type=int, default=default_size, help=f"Image width in {size_help}."),
        click.option("--C", "latent_channels", type=int, help="Latent channels (default: the model's, 4 SD, 16 Flux)."),
        click.option("--f", "downscale", type=int, default=defaults.DEFAULT_DOWNSCALE, show_default=True, help="VAE downscale factor."),
        click.option("--ddim_steps", "--steps", "steps", type=int,
                     help=f"Sampling steps (default: the family's, {defaults.DEFAULT_STEPS} SD, 28 Flux.1 dev, 4 schnell)."),
        click.option("--scale", type=float,
                     help=f"Classifier-free guidance scale, 1 turns it off (default: the family's, {defaults.DEFAULT_SCALE:g} SD, 1 Flux)."),
        click.option("--guidance", type=float, help="Flux.1 dev's distilled guidance (default 3.5; no effect on schnell)."),
        click.option("--max-sequence-length", "max_sequence_length", type=int,
                     help="Flux.1: T5 tokens per prompt, 1 to 512 (default: dev 512, schnell 256)."),
        click.option("--cfg-normalization", "cfg_normalization", type=float,
                     help="Z-Image: cap the guided output's norm at this times the prompt's (default 0: off)."),
        click.option("--cfg-truncation", "cfg_truncation", type=float,
                     help="Z-Image: the share of the run (0 to 1) after which CFG stops, the prompt alone (default 1: never)."),
        click.option("--ddim_eta", "eta", type=float, default=defaults.DEFAULT_ETA, show_default=True, help="DDIM eta (0: deterministic)."),
        click.option("--sampler", help=f"ddim, plms, euler, euler_a, heun, dpm2, dpm2_a, lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde (default: the family's, {defaults.DEFAULT_SAMPLER} SD, euler Flux)."),
        click.option("--karras", is_flag=True, help="Karras sigma schedule (k-samplers only); same as --schedule karras."),
        click.option("--schedule", help="k-sampler sigma grid: linspace (default, diffusers'), automatic, uniform, karras, exponential, sgm_uniform."),
        click.option("--lora", "loras", multiple=True, help="LoRA file, FILE or FILE:WEIGHT (repeatable; default weight 1)."),
        control_options(),
        click.option("--n_samples", type=int, default=5, show_default=True, help="Images per batch."),  # optimizedSD's default
        click.option("--n_iter", type=int, default=defaults.DEFAULT_N_ITER, show_default=True, help="Number of batches."),
        click.option("--seed", type=int, help="Seed of the first image (image i uses seed+i); random when omitted."),
        click.option("--fixed_code", is_flag=True, help="Reuse the same starting noise (seeds) for every batch."),
        load_options(),
        click.option("--turbo", is_flag=True, help="optimizedSD's --turbo: same as --memory turbo."),
        click.option("--unet_bs", "unet_batch", type=int, help="UNet micro-batch size (default: the whole CFG batch)."),
        click.option("--format", "fmt", default=defaults.DEFAULT_IMAGE_FORMAT, show_default=True, help="png or jpg."),
        click.option("--skip_grid", is_flag=True, help="Do not write a grid of the images."),
        click.option("--skip_save", is_flag=True, help="Do not write the individual images."),
        click.option("--n_rows", type=int, default=0, help="Images per grid row (default: n_samples)."),
        click.option("--preview-every", "preview_every", type=int, default=0, show_default=True,
                     help="Write a preview of the first image every N sampling steps to OUTDIR/previews/ (0: none)."),
        click.option("--preview", help="How previews are decoded: latent (a 4x3 projection) or taesd (default: taesd with a decoder, else latent)."),
        click.option("--preview-decoder", "preview_decoder", type=click.Path(path_type=Path),
                     help="TAESD decoder for previews (taesd_decoder.* SD 1.x/2.x, taesdxl_decoder.* SDXL)."),
        click.option("--report", is_flag=True, help="Print time and peak memory per stage."),
        click.option("--report-json", "report_json", type=click.Path(path_type=Path), help="Write the report as JSON."),
    ]
    return apply_options(options)


def hires_options() -> Callable:
    """txt2img's hires-fix flags (AUTOMATIC1111's two passes); each defaults to None so `hires_from_flags` sees what was given."""
    return apply_options([
        click.option("--hr-scale", "hr_scale", type=float, help=f"Hires fix: a second img2img pass at this many times --H/--W (e.g. {defaults.DEFAULT_HR_SCALE:g})."),
        click.option("--hr-resize", "hr_resize", help="Hires fix to WIDTHxHEIGHT instead of --hr-scale (another aspect: covered, then cropped)."),
        click.option("--hr-upscaler", "hr_upscaler", help="latent (default), latent-antialiased, latent-bicubic, latent-bicubic-antialiased, latent-nearest, "
                     "latent-nearest-exact (the latents interpolated), or lanczos, nearest, none (the image resized and encoded again)."),
        click.option("--hr-steps", "hr_steps", type=int, help="Second pass steps (default 0: --ddim_steps)."),
        click.option("--hr-strength", "hr_strength", type=float, help=f"Second pass denoising strength (default {defaults.DEFAULT_HR_STRENGTH:g})."),
        click.option("--hr-sampler", "hr_sampler", help="Second pass sampler (default: --sampler)."),
        click.option("--hr-prompt", "hr_prompt", help="Second pass prompt (default: --prompt)."),
        click.option("--hr-negative-prompt", "hr_negative_prompt", help="Second pass negative prompt (default: --negative-prompt)."),
    ])  # fmt: skip


def hires_from_flags(flags: dict) -> dict:
    """The Job's hires fields from the --hr-* flags: --hr-scale or --hr-resize turns it on; another --hr-* flag without them is a mistake."""
    given = {name: flags[name] for name in HIRES_FIELDS if flags.get(name) is not None}
    if not given:
        return {}
    if "hr_scale" not in given and "hr_resize" not in given:
        raise UserError(f"{CLI_FLAGS[next(iter(given))]} needs --hr-scale or --hr-resize (the hires fix is off)")
    if "hr_resize" in given:
        text = given["hr_resize"]
        parts = text.lower().split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise FieldError.about("hr_resize", f"{text!r} must be WIDTHxHEIGHT, e.g. 1024x768")
        given["hr_resize"] = (int(parts[0]), int(parts[1]))
    return {**given, "hires": True}


@click.group()
@click.version_option(package_name="optimized-sd")
def cli() -> None:
    """Low-VRAM Stable Diffusion (SD 1.x, SD 2.x, SDXL): txt2img and img2img on small GPUs or the CPU."""


def control_options() -> Callable:
    """The ControlNet flags: --controlnet FILE[:WEIGHT] and --control-image IMAGE, repeatable and paired in order,
    and the per-unit settings (`CONTROL_SETTINGS`), each given once for every unit or once per unit."""
    number, text = dict(type=float, multiple=True), dict(multiple=True)
    return apply_options([
        click.option("--controlnet", "controlnets", multiple=True, metavar="FILE[:WEIGHT]",
                     help="ControlNet file or diffusers folder, with its weight (default 1; repeatable, paired with --control-image)."),
        click.option("--control-image", "control_images", multiple=True, type=click.Path(path_type=Path),
                     help="Control image of the --controlnet at the same position (repeatable)."),
        click.option("--control-start", "control_start", **number, help="Fraction of the steps before the ControlNet starts (default 0)."),
        click.option("--control-end", "control_end", **number, help="Fraction of the steps after which it stops (default 1)."),
        click.option("--control-mode", "control_mode", **text, help="balanced (default), prompt or controlnet."),
        click.option("--control-resize", "control_resize", **text, help="crop (default), resize or fill: how the image meets W x H."),
        click.option("--control-preprocessor", "control_preprocessor", **text, help="none (default), invert or canny."),
        click.option("--control-threshold-a", "control_threshold_a", **number, help="canny's low threshold (default 100)."),
        click.option("--control-threshold-b", "control_threshold_b", **number, help="canny's high threshold (default 200)."),
    ])  # fmt: skip


def job_from_flags(
    flags: dict, init_img: Path | None = None, strength: float = defaults.DEFAULT_STRENGTH, inpaint=None, max_image_pixels: int | None = None
):
    """The generation flags as a Job (txt2img, img2img and batch's defaults): each flag's value goes to the
    request field CLI_FLAGS maps it from (the click option's name is the field's)."""
    from optimized_sd.pipelines.controlnet import control_specs
    from optimized_sd.pipelines.job import Job, OutputPolicy

    given = {name: flags[name] for name in CLI_FLAGS if name in flags and name not in (*OUTPUT_FIELDS, *HIRES_FIELDS)}
    given.update(hires_from_flags(flags))
    settings = {name: flags[f"control_{name}"] for name in CONTROL_SETTINGS}
    controlnets = control_specs(flags["controlnets"], flags["control_images"], **settings)
    return Job(
        **{**given, "loras": tuple(flags["loras"]), "controlnets": controlnets},
        prompts=(flags["prompt"],) if flags["prompt_file"] is None else (),
        init_image=init_img,
        strength=strength,
        inpaint=inpaint,
        max_image_pixels=max_image_pixels,
        output=OutputPolicy(**{name: flags[name] for name in OUTPUT_FIELDS}),
    )


def run_from_flags(
    flags: dict, init_img: Path | None = None, strength: float = defaults.DEFAULT_STRENGTH, inpaint=None, max_image_pixels: int | None = None
) -> None:
    """Flags -> a Job and a loader; run it with a progress bar; print what was written."""
    from tqdm import tqdm

    from optimized_sd.pipelines.job import JobStep, describe_memory, memory_mode, run_job
    from optimized_sd.pipelines.previews import preview_decoder_path

    memory = memory_mode(flags["memory"], flags["turbo"])
    preview_decoder = preview_decoder_path(flags["preview"], flags["preview_decoder"], flags["vae"], flags["preview_every"])
    job = job_from_flags(flags, init_img, strength, inpaint, max_image_pixels)
    bars: list[tqdm] = []  # one per batch, made at its first step, so an early error prints alone

    def progress(step: JobStep) -> None:
        if step.info.step == 0:
            for bar in bars:
                bar.close()
            bars[:] = [tqdm(total=step.info.total, desc=f"sampling ({step.request.sampler or 'default'})", unit="step", leave=False)]
        bars[0].n = step.info.step
        bars[0].refresh()

    try:
        loading = dataclasses.replace(load_options_from(flags, memory), preview_decoder=preview_decoder)
        result = run_job(lambda: loading.load(flags["ckpt"]), job, progress)
    finally:
        for bar in bars:
            bar.close()
    config = result.pipeline.config
    prediction = "v" if config.prediction_type == "v_prediction" else "eps"
    if config.record.prediction == "flow":
        click.echo(f"{config.family_name}, flow matching")
    else:
        click.echo(f"{config.family_name}, {prediction} prediction ({result.pipeline.prediction_reason})")
    click.echo(f"seed {result.first_seed}" + (" (random)" if flags["seed"] is None else ""))
    written = result.written
    click.echo(f"mode {describe_memory(result.pipeline)}; {len(result.images)} image(s)" + (f", wrote {len(written)} file(s):" if written else ""))
    for path in written:
        click.echo(f"  {path}")
    if flags["report"]:
        click.echo(result.pipeline.meter.format_table())


@cli.command()
@generation_options("outputs/txt2img-samples", None)
@hires_options()
def txt2img(**flags) -> None:
    """Generate images from a prompt."""
    run_from_flags(flags)


max_image_pixels_option = click.option(
    "--max-image-pixels",
    "max_image_pixels",
    type=int,
    help="Refuse init images with more pixels (default: $OPTIMIZED_SD_MAX_IMAGE_PIXELS, else 89478485, PIL's limit).",
)


@cli.command()
@click.option("--init-img", "init_img", type=click.Path(path_type=Path), required=True, help="Image to edit (any format PIL reads).")
@click.option("--strength", type=float, default=defaults.DEFAULT_STRENGTH, show_default=True, help="How much may change: 0 keeps the image, 1 ignores it.")
@max_image_pixels_option
@generation_options("outputs/img2img-samples", None)
def img2img(init_img: Path, strength: float, max_image_pixels: int | None, **flags) -> None:
    """Edit an image guided by a prompt."""
    run_from_flags(flags, init_img=init_img, strength=strength, max_image_pixels=max_image_pixels)


NOT_FOR_BATCH = ("prompt_file", "skip_save", "n_rows", "report_json", "preview_every", "preview", "preview_decoder")


def worker_pool(spec: LoadSpec, ray_address: str | None, workers: int | None, gpus_per_worker: float | None,
                cpu_threads: int | None) -> WorkerPool:
    """Where a batch's images are made: this process, or Ray workers (a local runtime, or a cluster's)."""
    from optimized_sd.batch import LocalPool

    if ray_address is None:
        return LocalPool(spec)
    from optimized_sd.batch.ray_pool import RayPool, connect, default_workers

    ray = connect(None if ray_address == "local" else ray_address, num_cpus=(workers or 1) * (cpu_threads or 1))
    share = gpus_per_worker if gpus_per_worker is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    spec = dataclasses.replace(spec, gpu_share=share or 1.0)
    return RayPool(ray, spec, workers or default_workers(ray, share), share)


@cli.command()
@click.argument("jobs_file", metavar="JOBS", type=click.Path(path_type=Path))
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Fan out over Ray: alone, a local runtime; with HOST:PORT or 'auto', join that cluster.")
@click.option("--workers", type=int, help="Ray workers (default: one per GPU share of the cluster, else 1).")
@click.option("--gpus-per-worker", "gpus_per_worker", type=float,
              help="GPUs per Ray worker, fractional to share a card (default: 1 with GPUs, else 0: CPU workers).")
@click.option("--cpu-threads", "cpu_threads", type=int,
              help="torch CPU threads per worker (default: torch's own in this process, 1 per Ray CPU worker); equal counts give equal bytes.")
@click.option("--init-img", "init_img", type=click.Path(path_type=Path), help="Default init image (img2img) for jobs that give none.")
@click.option("--strength", type=float, default=defaults.DEFAULT_STRENGTH, show_default=True, help="Default img2img strength.")
@generation_options("outputs/batch-samples", None)
def batch(jobs_file: Path, ray_address: str | None, workers: int | None, gpus_per_worker: float | None, cpu_threads: int | None,
          init_img: Path | None, strength: float, **flags) -> None:
    """Run a job file: JSON Lines (one generation per line; omitted fields take these flags' values) or
    one prompt per line. Re-running with the same --outdir completes only what batch.jsonl lacks."""
    from tqdm import tqdm

    from optimized_sd.batch import BatchProgress, LoadSpec, read_jobs, run_batch
    from optimized_sd.pipelines.job import memory_mode

    for name in NOT_FOR_BATCH:
        if flags[name]:
            raise UserError(f"{CLI_FLAGS.get(name) or '--' + name.replace('_', '-')} does not apply to batch (prompts and options come from JOBS)")
    if ray_address is None and (workers is not None or gpus_per_worker is not None):
        raise UserError("--workers and --gpus-per-worker need --ray")
    jobs = read_jobs(jobs_file, job_from_flags(flags, init_img, strength))
    spec = LoadSpec(flags["ckpt"], load_options_from(flags, memory_mode(flags["memory"], flags["turbo"])),
                    gpu_share=gpus_per_worker or 1.0, cpu_threads=cpu_threads)
    if cpu_threads is not None and cpu_threads < 1:
        raise UserError("--cpu-threads must be at least 1")
    pool = worker_pool(spec, ray_address, workers, gpus_per_worker, cpu_threads)
    bars: list[tqdm] = []  # made at the first image, so loading messages and early errors print alone

    def progress(step: BatchProgress) -> None:
        if not bars:
            bars.append(tqdm(total=step.total, desc="batch", unit="image"))
        bars[0].update(1)

    try:
        report = run_batch(jobs, flags["outdir"], pool, progress)
    finally:
        for bar in bars:
            bar.close()
    click.echo(f"wrote {len(report.written)} image(s); {report.skipped} already in {flags['outdir'] / 'batch.jsonl'}")
    if flags["report"] and report.written:
        for worker in sorted({r.worker for r in report.written}):
            mine = [r for r in report.written if r.worker == worker]
            click.echo(f"  {worker} ({mine[0].device}): {len(mine)} image(s), {sum(r.seconds for r in mine) / len(mine):.2f} s each, "
                       f"peak {max(r.peak_vram_mib for r in mine):.0f} MiB VRAM / {max(r.peak_rss_mib for r in mine):.0f} MiB RSS")
    if report.failures:
        for line, index, reason in report.failures:
            click.echo(f"failed: line {line}" + ("" if index is None else f" image {index}") + f": {reason}", err=True)
        sys.exit(1)


@cli.command()
@click.option("--ckpt", type=click.Path(path_type=Path), help=f"Checkpoint to load (default without --models-dir: {DEFAULT_CKPT}).")
@click.option("--models-dir", "models_dir", type=click.Path(path_type=Path), help="Folder of models the UI and API may switch between (by name only).")
@click.option("--host", help="Address to bind (default 127.0.0.1; 0.0.0.0 with --listen).")
@click.option("--port", type=int, default=7860, show_default=True, help="Port to bind (0: any free port).")
@click.option("--listen", is_flag=True, help="Accept connections from the network, not only from this machine.")
@click.option("--auth", help="USER:PASS required by the UI (login page) and the API (HTTP basic).")
@load_options("Default memory mode (a request may name its own): auto, full, turbo, split or stream.")
def serve(**flags) -> None:
    """Web UI and AUTOMATIC1111-compatible HTTP API, one model loaded once (needs the [ui] extra)."""
    from optimized_sd.server import app

    if flags["ckpt"] is None and flags["models_dir"] is None:
        flags["ckpt"] = Path(DEFAULT_CKPT)
    loading = load_options_from(flags)
    server = {name: value for name, value in flags.items() if name not in LOAD_FLAGS}
    app.serve(app.ServeOptions(**server, loading=loading))


@cli.command()
@click.option("--init-img", "init_img", type=click.Path(path_type=Path), required=True, help="Image to repaint (any format PIL reads).")
@click.option("--mask", type=click.Path(path_type=Path), help="White is repainted, black kept; L/RGB: luminance, RGBA/LA: alpha unless all opaque.")
@click.option("--invert-mask", "invert_mask", is_flag=True, help="Repaint the black part of the mask instead.")
@click.option("--mask-blur", "mask_blur", type=float, default=defaults.DEFAULT_MASK_BLUR, show_default=True, help="Blur of the mask's edge in pixels.")
@click.option("--strength", type=float, default=defaults.DEFAULT_INPAINT_STRENGTH, show_default=True, help="How much the masked part may change (1: from pure noise).")
@click.option("--inpaint-area", "inpaint_area", default="whole", show_default=True, help="whole, or masked: only the mask's box plus --padding, at --H/--W.")
@click.option("--padding", type=int, default=defaults.DEFAULT_PADDING, show_default=True, help="Pixels around the mask's box for --inpaint-area masked.")
@click.option("--outpaint", help="LEFT,RIGHT,TOP,BOTTOM: grow the canvas by these pixels and paint the new border.")
@click.option("--masked-content", "masked_content", default=defaults.DEFAULT_MASKED_CONTENT, show_default=True, help="What the masked part starts from below strength 1: original, fill (surrounding colours), latent-noise or latent-nothing.")
@max_image_pixels_option
@generation_options("outputs/inpaint-samples", None)
def inpaint(
    init_img: Path, mask: Path | None, invert_mask: bool, mask_blur: float, strength: float, inpaint_area: str, padding: int,
    outpaint: str | None, masked_content: str, max_image_pixels: int | None, **flags
) -> None:
    """Repaint the masked part of an image, or paint a grown border (outpainting)."""
    from optimized_sd.pipelines.masks import InpaintOptions, parse_outpaint

    border = parse_outpaint(outpaint) if outpaint is not None else None
    options = InpaintOptions(mask, invert_mask, mask_blur, inpaint_area, padding, border, masked_content)
    run_from_flags(flags, init_img=init_img, strength=strength, inpaint=options, max_image_pixels=max_image_pixels)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--weights", help="Also say which layers --weights fp16|bf16|fp8|int8 stores that way and which stay 16-bit.")
def inspect(checkpoint: Path, weights: str | None) -> None:
    """Say what a checkpoint file is, without building a model (with --weights, a model on meta: no weights read)."""
    from optimized_sd.weights.inspect import describe_checkpoint, format_info

    if weights is not None:
        from optimized_sd.pipelines.weight_storage import check_weight_kind

        check_weight_kind(weights)
    click.echo(format_info(describe_checkpoint(checkpoint)))
    if weights is not None:
        from optimized_sd.pipelines.weight_storage import describe_storage

        click.echo(describe_storage(checkpoint, weights))


def register_bench() -> None:
    """`optimized-sd bench` lives with the benchmark harness; its module imports nothing heavy."""
    from optimized_sd.benchmark.command import bench

    cli.add_command(bench)


class OneLineHandler(logging.Handler):
    """Warnings from the library as 'warning: ...' lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit status 1 (2 for bad flags)."""
    logger = logging.getLogger("optimized_sd")
    if not any(isinstance(h, OneLineHandler) for h in logger.handlers):
        logger.addHandler(OneLineHandler())
        logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        register_bench()
        cli.main(args=argv, prog_name="optimized-sd", standalone_mode=False)
    except FieldError as error:
        click.echo(f"error: {flag_words(error)}", err=True)
        sys.exit(1)
    except UserError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except (KeyboardInterrupt, Interrupted):
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

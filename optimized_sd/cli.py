"""`optimized-sd` command line: parse flags, build a Job, run it with a progress bar, print. No logic."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from optimized_sd.errors import Interrupted, UserError

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"


def generation_options(default_outdir: str, default_size: int | None) -> Callable:
    """The flags txt2img and img2img share (optimizedSD's names), applied as one decorator."""
    size_help = "pixels (multiple of 8)" + ("" if default_size else "; default: the init image's size floored to 64")
    options = [
        click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Prompt; 'a:0.25 b:0.75' mixes weighted subprompts."),
        click.option("--from-file", "from_file", type=click.Path(path_type=Path), help="Read prompts from a file, one per line."),
        click.option("--negative-prompt", "negative_prompt", default="", help="What to steer away from (the unconditional prompt)."),
        click.option("--outdir", type=click.Path(path_type=Path), default=default_outdir, show_default=True, help="Output root folder."),
        click.option("--ckpt", type=click.Path(path_type=Path), default=DEFAULT_CKPT, show_default=True, help="Checkpoint: .ckpt, .safetensors or a diffusers folder."),
        click.option("--config", type=click.Path(path_type=Path), help="JSON model config overriding the one read off the weights."),
        click.option("--tokenizer", type=click.Path(path_type=Path), help="CLIP tokenizer folder (vocab.json, merges.txt)."),
        click.option("--ema", is_flag=True, help="Use the checkpoint's EMA UNet weights."),
        click.option("--H", "height", type=int, default=default_size, help=f"Image height in {size_help}."),
        click.option("--W", "width", type=int, default=default_size, help=f"Image width in {size_help}."),
        click.option("--C", "channels", type=int, default=4, show_default=True, help="Latent channels."),
        click.option("--f", "downscale", type=int, default=8, show_default=True, help="VAE downscale factor."),
        click.option("--ddim_steps", "--steps", "steps", type=int, default=50, show_default=True, help="Sampling steps (all samplers)."),
        click.option("--scale", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale (1 turns guidance off)."),
        click.option("--ddim_eta", "eta", type=float, default=0.0, show_default=True, help="DDIM eta (0: deterministic)."),
        click.option("--sampler", default="plms", show_default=True, help="ddim, plms, euler, euler_a, heun, dpm2, dpm2_a, lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde."),
        click.option("--karras", is_flag=True, help="Karras sigma schedule (k-samplers only); same as --schedule karras."),
        click.option("--schedule", help="k-sampler sigma grid: linspace (default, diffusers'), automatic, uniform, karras, exponential, sgm_uniform."),
        click.option("--lora", multiple=True, help="LoRA file, FILE or FILE:WEIGHT (repeatable; default weight 1)."),
        click.option("--lora-dir", "lora_dir", type=click.Path(path_type=Path), default="models/Lora", show_default=True, help="Where <lora:NAME:WEIGHT> in a prompt finds NAME.safetensors."),
        click.option("--embeddings-dir", "embeddings_dir", type=click.Path(path_type=Path), default="embeddings", show_default=True, help="Textual-inversion files, used by writing their file name in a prompt."),
        click.option("--n_samples", type=int, default=5, show_default=True, help="Images per batch."),
        click.option("--n_iter", type=int, default=1, show_default=True, help="Number of batches."),
        click.option("--seed", type=int, help="Seed of the first image (image i uses seed+i); random when omitted."),
        click.option("--fixed_code", is_flag=True, help="Reuse the same starting noise (seeds) for every batch."),
        click.option("--device", help="cuda, cuda:N, cpu or mps (default: the best available)."),
        click.option("--precision", default="autocast", show_default=True, help="autocast (fp16 on GPU, fp32 on CPU), full (fp32), fp16 or bf16."),
        click.option("--memory", default="auto", show_default=True, help="auto, full, turbo, split or stream."),
        click.option("--turbo", is_flag=True, help="optimizedSD's --turbo: same as --memory turbo."),
        click.option("--vram-budget", "vram_budget", help="Plan for this much device memory, e.g. 1.5GB."),
        click.option("--attention", default="sdpa", show_default=True, help="sdpa, xformers, sliced or naive."),
        click.option("--vae-tiling", "vae_tiling", default="auto", show_default=True, help="auto, on or off."),
        click.option("--unet_bs", type=int, help="UNet micro-batch size (default: the whole CFG batch)."),
        click.option("--format", "fmt", default="png", show_default=True, help="png or jpg."),
        click.option("--skip_grid", is_flag=True, help="Do not write a grid of the images."),
        click.option("--skip_save", is_flag=True, help="Do not write the individual images."),
        click.option("--n_rows", type=int, default=0, help="Images per grid row (default: n_samples)."),
        click.option("--report", is_flag=True, help="Print time and peak memory per stage."),
        click.option("--report-json", "report_json", type=click.Path(path_type=Path), help="Write the report as JSON."),
    ]

    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@click.group()
@click.version_option(package_name="optimized-sd")
def cli() -> None:
    """Low-VRAM Stable Diffusion 1.x: txt2img and img2img on small GPUs or the CPU."""


def run_from_flags(flags: dict, init_img: Path | None = None, strength: float = 0.75) -> None:
    """Flags -> a Job and a loader; run it with a progress bar; print what was written."""
    from tqdm import tqdm

    from optimized_sd.pipelines.diffusion import load
    from optimized_sd.pipelines.job import Job, JobStep, OutputPolicy, describe_memory, memory_mode, run_job

    memory = memory_mode(flags["memory"], flags["turbo"])
    job = Job(
        prompts=(flags["prompt"],) if flags["from_file"] is None else (),
        prompt_file=flags["from_file"],
        negative_prompt=flags["negative_prompt"],
        seed=flags["seed"],
        n_samples=flags["n_samples"],
        n_iter=flags["n_iter"],
        fixed_code=flags["fixed_code"],
        steps=flags["steps"],
        scale=flags["scale"],
        eta=flags["eta"],
        sampler=flags["sampler"],
        karras=flags["karras"],
        schedule=flags["schedule"],
        loras=tuple(flags["lora"]),
        height=flags["height"],
        width=flags["width"],
        latent_channels=flags["channels"],
        downscale=flags["downscale"],
        unet_batch=flags["unet_bs"],
        init_image=init_img,
        strength=strength,
        output=OutputPolicy(
            outdir=flags["outdir"],
            fmt=flags["fmt"],
            skip_save=flags["skip_save"],
            skip_grid=flags["skip_grid"],
            n_rows=flags["n_rows"],
            report_json=flags["report_json"],
        ),
    )
    options = ("config", "ema", "device", "precision", "vram_budget", "attention", "vae_tiling", "tokenizer", "lora_dir", "embeddings_dir")
    bars: list[tqdm] = []  # one per batch, made at its first step, so an early error prints alone

    def progress(step: JobStep) -> None:
        if step.info.step == 0:
            for bar in bars:
                bar.close()
            bars[:] = [tqdm(total=step.info.total, desc=f"sampling ({step.request.sampler})", unit="step", leave=False)]
        bars[0].n = step.info.step
        bars[0].refresh()

    try:
        result = run_job(lambda: load(flags["ckpt"], memory=memory, **{name: flags[name] for name in options}), job, progress)
    finally:
        for bar in bars:
            bar.close()
    click.echo(f"seed {result.first_seed}" + (" (random)" if flags["seed"] is None else ""))
    written = result.written
    click.echo(f"mode {describe_memory(result.pipeline)}; {len(result.images)} image(s)" + (f", wrote {len(written)} file(s):" if written else ""))
    for path in written:
        click.echo(f"  {path}")
    if flags["report"]:
        click.echo(result.pipeline.meter.format_table())


@cli.command()
@generation_options("outputs/txt2img-samples", 512)
def txt2img(**flags) -> None:
    """Generate images from a prompt."""
    run_from_flags(flags)


@cli.command()
@click.option("--init-img", "init_img", type=click.Path(path_type=Path), required=True, help="Image to edit (any format PIL reads).")
@click.option("--strength", type=float, default=0.75, show_default=True, help="How much may change: 0 keeps the image, 1 ignores it.")
@generation_options("outputs/img2img-samples", None)
def img2img(init_img: Path, strength: float, **flags) -> None:
    """Edit an image guided by a prompt."""
    run_from_flags(flags, init_img=init_img, strength=strength)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
def inspect(checkpoint: Path) -> None:
    """Say what a checkpoint file is, without building a model."""
    from optimized_sd.weights.inspect import describe_checkpoint, format_info

    click.echo(format_info(describe_checkpoint(checkpoint)))


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

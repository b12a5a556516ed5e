"""A command-line run: check every flag before any model work, then loop over batches and save."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from optimized_sd.errors import UserError
from optimized_sd.memory.planner import format_bytes
from optimized_sd.pipelines.diffusion import GenerationRequest, check_size, load, load_init_image
from optimized_sd.pipelines.networks import lora_weights
from optimized_sd.pipelines.output import encode, ensure_writable, make_grid, prompt_folder, save_image, write_new
from optimized_sd.pipelines.prompts import read_prompt_file
from optimized_sd.sampling import make_plan

log = logging.getLogger("optimized_sd")


def batches(flags: dict[str, Any]) -> list[list[str]]:
    """Prompt batches of n_samples: the prompt repeated, or the file's prompts each repeated and
    chunked (CompVis order; optimizedSD's sorting is dropped so batch i follows line i)."""
    size = flags["n_samples"]
    if flags["from_file"] is None:
        return [[flags["prompt"]] * size]
    repeated = [p for p in read_prompt_file(flags["from_file"]) for _ in range(size)]
    return [repeated[i : i + size] for i in range(0, len(repeated), size)]


def validate(flags: dict[str, Any], strength: float | None) -> None:
    """Everything that can be checked without the model, so a mistake costs no loading time."""
    for name in ("n_samples", "n_iter"):
        if flags[name] < 1:
            raise UserError(f"--{name} must be at least 1")
    if flags["unet_bs"] is not None and flags["unet_bs"] < 1:
        raise UserError("--unet_bs must be at least 1")
    if flags["n_rows"] < 0:
        raise UserError("--n_rows must be 0 (one row per batch) or more")
    if flags["fmt"] not in ("png", "jpg"):
        raise UserError(f"unknown --format {flags['fmt']!r}; use png or jpg")
    if flags["height"] is not None and flags["width"] is not None:
        check_size(flags["height"], flags["width"])
    elif flags["height"] is not None or flags["width"] is not None:
        given = flags["height"] if flags["height"] is not None else flags["width"]
        check_size(given, given)
    make_plan(
        flags["sampler"],
        flags["steps"],
        strength=1.0 if strength is None else strength,
        eta=flags["eta"],
        karras=flags["karras"],
        schedule_type=flags["schedule"],
    )
    for path in lora_weights(flags["lora"]):
        if not path.is_file():
            raise UserError(f"--lora {path}: no such file")
    if flags["turbo"] and flags["memory"] not in ("auto", "turbo"):
        raise UserError(f"--turbo and --memory {flags['memory']} disagree; give one of them")


def run_generation(flags: dict[str, Any], init_img: Path | None, strength: float | None) -> None:
    """txt2img when `init_img` is None, else img2img; the same loop for both."""
    validate(flags, strength)
    prompt_batches = batches(flags)
    init_image = load_init_image(init_img, flags["height"], flags["width"]) if init_img is not None else None
    writes = not (flags["skip_save"] and flags["skip_grid"])
    if writes:
        ensure_writable(flags["outdir"])
    pipe = load(
        flags["ckpt"],
        config=flags["config"],
        ema=flags["ema"],
        device=flags["device"],
        precision=flags["precision"],
        memory="turbo" if flags["turbo"] else flags["memory"],
        vram_budget=flags["vram_budget"],
        attention=flags["attention"],
        vae_tiling=flags["vae_tiling"],
        tokenizer=flags["tokenizer"],
        lora_dir=flags["lora_dir"],
        embeddings_dir=flags["embeddings_dir"],
    )
    seed = flags["seed"] if flags["seed"] is not None else random.randint(0, 2**32 - 1)
    click.echo(f"seed {seed}" + (" (random)" if flags["seed"] is None else ""))
    images, written = [], []
    for _ in range(flags["n_iter"]):
        for prompts in prompt_batches:
            request = GenerationRequest(
                prompts=prompts,
                negative_prompt=flags["negative_prompt"],
                steps=flags["steps"],
                scale=flags["scale"],
                eta=flags["eta"],
                sampler=flags["sampler"],
                karras=flags["karras"],
                seed=seed,
                height=flags["height"] or 512,
                width=flags["width"] or 512,
                latent_channels=flags["channels"],
                downscale=flags["downscale"],
                unet_batch=flags["unet_bs"],
                init_image=init_image,
                strength=strength if strength is not None else 0.75,
                loras=flags["lora"],
                schedule=flags["schedule"],
            )
            bars: list[tqdm] = []  # made at the first step, so an early error prints alone

            def progress(done: int, total: int) -> None:
                if not bars:
                    bars.append(tqdm(total=total, desc=f"sampling ({request.sampler})", unit="step", leave=False))
                bars[0].n = done
                bars[0].refresh()

            try:
                result = pipe.generate(request, progress)
            finally:
                for bar in bars:
                    bar.close()
            for image, used_seed, parameters, prompt in zip(result.images, result.seeds, result.parameters, prompts):
                if not flags["skip_save"]:
                    folder = prompt_folder(flags["outdir"], prompt)
                    folder.mkdir(parents=True, exist_ok=True)
                    written.append(save_image(image, folder, used_seed, flags["fmt"], parameters))
            images.extend(result.images)
            if not flags["fixed_code"]:
                seed += len(prompts)
    if not flags["skip_grid"] and len(images) > 1:
        grid = make_grid(images, flags["n_rows"] or flags["n_samples"])
        data = encode(grid, flags["fmt"], result.parameters[0].text())
        written.append(write_new(Path(flags["outdir"]), "grid", flags["fmt"], data, 0))
    ahead = pipe.engine.lookahead_bytes if pipe.engine is not None and pipe.engine.prefetch_enabled else 0
    mode = f"{pipe.mode} (copying up to {format_bytes(ahead)} of blocks ahead)" if ahead else pipe.mode
    click.echo(f"mode {mode} on {pipe.device}; {len(images)} image(s)" + (f", wrote {len(written)} file(s):" if written else ""))
    for path in written:
        click.echo(f"  {path}")
    if flags["report"]:
        click.echo(pipe.meter.format_table())
    if flags["report_json"]:
        pipe.meter.write_json(flags["report_json"], {"mode": pipe.mode, "plan": pipe.plan.__dict__ if pipe.plan else None})

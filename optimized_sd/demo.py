"""`make demo`: one image from a real SD 1.5 checkpoint, or, where none can be had, from a random-weight
model of the full SD 1.5 architecture (clearly labelled: the picture is noise by design)."""

from __future__ import annotations

from pathlib import Path

import click

from optimized_sd.cli import main as cli_main

HUB_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB_FILE = "v1-5-pruned-emaonly.safetensors"
PROMPT = "a lighthouse at dusk, oil painting"


def hub_reachable(host: str = "huggingface.co", timeout: float = 5.0) -> bool:
    """One quick connection attempt, so an offline machine is told at once rather than after the
    hub client's retries."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch_public_checkpoint() -> Path | None:
    """The public SD 1.5 file through huggingface_hub (its usual cache); None when it cannot be had."""
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry chatter is not for users
    try:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(HUB_REPO, HUB_FILE, local_files_only=True))
        except Exception:  # not cached yet
            pass
        if not hub_reachable():
            click.echo(f"demo: the Hugging Face hub cannot be reached, so {HUB_REPO}/{HUB_FILE} cannot be fetched")
            return None
        return Path(hf_hub_download(HUB_REPO, HUB_FILE))
    except Exception as error:  # no hub package, gated repo, network failure: all mean "use the fallback"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        click.echo(f"demo: cannot fetch {HUB_REPO}/{HUB_FILE} from the Hugging Face hub ({reason[:120]})")
        return None


@click.command()
@click.option("--ckpt", type=click.Path(path_type=Path), help="Your own SD 1.x checkpoint (skips the download).")
@click.option("--outdir", default="outputs/demo", show_default=True)
def demo(ckpt: Path | None, outdir: str) -> None:
    """Generate one image with the main txt2img pipeline."""
    args = ["txt2img", "--prompt", PROMPT, "--n_samples", "1", "--seed", "42", "--report"]
    ckpt = ckpt or fetch_public_checkpoint()
    if ckpt is not None:
        cli_main([*args, "--ckpt", str(ckpt), "--outdir", outdir, "--sampler", "dpmpp_2m", "--karras", "--ddim_steps", "25"])
        return
    import torch

    from optimized_sd.benchmark.model_cache import ensure_model

    click.echo("demo: RANDOM WEIGHTS: running the same pipeline on a generated random-weight model of the full SD 1.5 architecture;")
    click.echo("demo: the image will be noise by design. Pass CKPT=path/to/sd-v1-5.safetensors for a real picture.")
    model = ensure_model()
    small = [] if torch.cuda.is_available() else ["--H", "256", "--W", "256", "--ddim_steps", "4"]
    cli_main(
        [
            *args,
            "--ckpt", str(model.checkpoint),
            "--tokenizer", str(model.tokenizer),
            "--outdir", f"{outdir}-RANDOM-WEIGHTS",
            "--sampler", "ddim",
            *small,
        ]
    )


if __name__ == "__main__":
    demo()

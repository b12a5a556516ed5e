"""optimized-sd: low-VRAM Stable Diffusion 1.x inference. `optimized_sd.load(path).txt2img(prompt)`."""

from __future__ import annotations

__version__ = "0.1.0"


def load(checkpoint, **options):  # -> optimized_sd.pipelines.diffusion.StableDiffusion
    """Open a checkpoint for generation; see `optimized_sd.pipelines.diffusion.load`."""
    from optimized_sd.pipelines.diffusion import load as load_pipeline

    return load_pipeline(checkpoint, **options)


__all__ = ["load", "__version__"]

"""Every default of a generation request, written once: `Job`, `GenerationRequest`, the CLI flags, the
batch file, the web UI and the API take them from here (the API keeps AUTOMATIC1111's own sampler, steps,
guidance and size defaults, which its clients expect, for the families whose record says so: `Defaults.a1111`;
see `server.backend.GenerationSpec`). Nothing heavy
is imported, so the CLI can show them in --help."""

from __future__ import annotations

from optimized_sd.config import REFINER_SWITCH_DEFAULT

DEFAULT_STEPS = 50
DEFAULT_SCALE = 7.5
DEFAULT_ETA = 0.0
DEFAULT_SAMPLER = "plms"
DEFAULT_STRENGTH = 0.75  # img2img: how much of the image may change
DEFAULT_INPAINT_STRENGTH = 1.0  # inpainting: the masked part from pure noise
DEFAULT_LATENT_CHANNELS = 4
DEFAULT_DOWNSCALE = 8
DEFAULT_N_SAMPLES = 1  # the library's; the CLI keeps optimizedSD's 5
DEFAULT_N_ITER = 1
DEFAULT_REFINER_SWITCH = REFINER_SWITCH_DEFAULT
DEFAULT_MASK_BLUR = 4.0
DEFAULT_PADDING = 32
DEFAULT_MASKED_CONTENT = "original"
DEFAULT_IMAGE_FORMAT = "png"
# hires fix (AUTOMATIC1111's two passes)
DEFAULT_HR_SCALE = 2.0
DEFAULT_HR_STRENGTH = 0.7  # AUTOMATIC1111's denoising_strength default for the hires pass
DEFAULT_HR_UPSCALER = "latent"
# Z-Image's CFG options (diffusers' ZImagePipeline arguments and defaults)
DEFAULT_CFG_NORMALIZATION = 0.0  # > 0: the guided output's norm capped at this times the positive's
DEFAULT_CFG_TRUNCATION = 1.0  # the share of the run (1 - sigma) after which the negative pass stops; 1: never

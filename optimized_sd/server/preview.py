"""Live previews for the web UI and `/sdapi/v1/progress`: a TAESD decoder from the models folder's
`VAE-approx/` (AUTOMATIC1111's name; `vae_approx/` as ComfyUI) named for the loaded family
(`taesd_decoder.*` SD 1.x/2.x, `taesdxl_decoder.*` SDXL), run on the CPU in the reading thread, so the
sampling on the device is not disturbed; else the 4x3 latent projection (`pipelines.previews`)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from optimized_sd.config import ModelConfig
from optimized_sd.errors import UserError
from optimized_sd.models.taesd import TinyDecoder
from optimized_sd.pipelines.previews import SD1_LATENT_RGB, latent_preview, taesd_preview

__all__ = ["SD1_LATENT_RGB", "PreviewDecoders", "approx_folders", "latent_preview"]

log = logging.getLogger("optimized_sd")

APPROX_FOLDER_NAMES = ("VAE-approx", "vae_approx")


def approx_folders(models_dir: Path | None, ckpt: Path | None) -> list[Path]:
    """Where TAESD decoders are looked for: `VAE-approx/` in the models folder and beside it
    (AUTOMATIC1111 keeps checkpoints in `models/Stable-diffusion/` and decoders in `models/VAE-approx/`),
    or beside a single `--ckpt`."""
    roots = [models_dir, models_dir.parent] if models_dir is not None else []
    if ckpt is not None:
        roots.append(ckpt.parent)
    return [root / name for root in roots for name in APPROX_FOLDER_NAMES]


class PreviewDecoders:
    """The TAESD decoder for each family found in `folders`, opened at first use and kept; the latent
    projection where none is found or the one found is unusable (logged once)."""

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders
        self._decoders: dict[str, TinyDecoder | None] = {}  # family -> its decoder, or None (the projection)
        self._lock = threading.Lock()
        self._last: tuple[Tensor, Image.Image] | None = None  # the latents last previewed and their picture

    def decoder(self, config: ModelConfig) -> TinyDecoder | None:
        from optimized_sd.weights.taesd import check_taesd_fits, find_taesd_decoder, open_taesd

        family = config.family
        if family not in self._decoders:
            found = next((path for folder in self.folders if (path := find_taesd_decoder(folder, family)) is not None), None)
            self._decoders[family] = None
            if found is not None:
                try:
                    tiny = open_taesd(found, "VAE-approx")
                    check_taesd_fits(tiny, config, "VAE-approx")
                    self._decoders[family] = tiny.place(torch.device("cpu"), torch.float32).decoder
                except UserError as error:
                    log.warning("previews use the latent projection: %s", error)
        return self._decoders[family]

    def image(self, latents: Tensor, config: ModelConfig | None) -> Image.Image:
        """The first image of `latents` as a preview, for the loaded model's `config` (the same latents
        object gives the same picture, decoded once: the API is polled more often than previews change)."""
        with self._lock:
            if self._last is not None and self._last[0] is latents:
                return self._last[1]
            decoder = self.decoder(config) if config is not None else None
            latent_format = config.record.latent if config is not None else None
            upscale = latent_format.downscale if latent_format is not None else 8
            image = taesd_preview(latents, decoder) if decoder is not None else latent_preview(latents, upscale, latent_format)
            self._last = (latents, image)
            return image

"""PIL images in and out of the pipeline: opening an init image, and pixels <-> tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from optimized_sd.errors import UserError
from optimized_sd.pipelines.image_files import read_image
from optimized_sd.pipelines.request import check_size


def open_image(path: Path | str, max_pixels: int | None = None) -> Image.Image:
    """Open any image PIL reads as RGB, at its own size (one UserError for any bad file: `image_files.read_image`)."""
    return read_image(path, "init image", lambda opened: opened.convert("RGB"), max_pixels, raise_with="max_image_pixels")


def load_init_image(path: Path | str, height: int | None, width: int | None, max_pixels: int | None = None) -> Image.Image:
    """Open any image PIL reads as RGB, at (W, H) when given, else its own size floored to 64."""
    image = open_image(path, max_pixels)
    target_w = width if width is not None else image.width - image.width % 64
    target_h = height if height is not None else image.height - image.height % 64
    if target_w < 64 or target_h < 64:
        raise UserError(f"init image {path} is {image.width}x{image.height}; it must be at least 64x64")
    check_size(target_h, target_w)
    return image if image.size == (target_w, target_h) else image.resize((target_w, target_h), Image.LANCZOS)


def image_to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> (1, 3, H, W) float in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def tensor_to_image(pixels: Tensor) -> Image.Image:
    """(1, 3, H, W) in about [-1, 1] -> PIL RGB."""
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)

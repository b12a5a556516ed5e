"""PIL images in and out of the pipeline: opening an init image, and pixels <-> tensors."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from optimized_sd.errors import UserError
from optimized_sd.pipelines.request import check_size

MAX_IMAGE_PIXELS_ENV = "OPTIMIZED_SD_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default (about a 9459x9459 image: 256 MiB of RGBA)


def max_image_pixels(limit: int | None = None) -> int:
    """The largest init image (in pixels) that is decoded: `limit`, else $OPTIMIZED_SD_MAX_IMAGE_PIXELS,
    else PIL's default. A small file can declare a huge image (a decompression bomb); this bounds it."""
    if limit is None:
        text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "")
        if not text:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            limit = int(text)
        except ValueError:
            raise UserError(f"${MAX_IMAGE_PIXELS_ENV} must be a whole number of pixels, not {text!r}") from None
    if limit < 1:
        raise UserError(f"the init image pixel limit must be at least 1, not {limit}")
    return limit


def open_image(path: Path | str, max_pixels: int | None = None) -> Image.Image:
    """Open any image PIL reads as RGB, at its own size (`read_image`'s checks, as the init image)."""
    return read_image(path, "init image", lambda opened: opened.convert("RGB"), max_pixels)


def read_image(path: Path | str, what: str, convert: Callable[[Image.Image], Image.Image], max_pixels: int | None = None) -> Image.Image:
    """`convert(image)` of the image file at `path` (an init image, a mask: `what` names it in errors).

    Every failure inside PIL is this file's problem, whatever PIL raises for it (a corrupt PNG chunk
    raises SyntaxError, an unknown DDS pixel format NotImplementedError, a truncated file OSError),
    so each becomes a UserError naming the file. An image over the pixel limit is refused from its
    header, before it is decoded: PIL's DecompressionBombWarning is replaced by this check (same
    default limit, configurable), and PIL's own hard limit (twice its default) stays an error."""
    limit = max_image_pixels(max_pixels)
    if Path(path).exists() and not Path(path).is_file():
        raise UserError(f"{what} {path} is not a regular file")  # a FIFO or a device would block the read
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below refuses it, with our limit
            with Image.open(path) as opened:
                pixels = opened.width * opened.height
                if pixels > limit:
                    raise UserError(
                        f"{what} {path} is {opened.width}x{opened.height} ({pixels:,} pixels), over the limit of {limit:,}; "
                        f"raise it with --max-image-pixels or ${MAX_IMAGE_PIXELS_ENV} if the file is trusted"
                    )
                opened.load()
                image = convert(opened)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except Image.DecompressionBombError:
        hard_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise UserError(f"{what} {path} declares more pixels than PIL ever decodes (over {hard_limit:,}); refused") from None
    except MemoryError:
        raise UserError(f"{what} {path} does not fit in memory") from None
    except Exception as error:  # noqa: BLE001 - the PIL boundary: any decoder failure is a bad file
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{what} {path} is not a readable image: {detail}") from None
    return image


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

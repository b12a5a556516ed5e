"""Image files at the PIL boundary (init images and masks): only a regular file is opened (a FIFO or a
device would block the read or never end it), the declared size is checked against a pixel limit
before decoding, and whatever PIL raises for a bad file becomes one UserError naming what the file is for."""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from optimized_sd.errors import CheckpointError, FieldError, UserError
from optimized_sd.weights.sources import _file_kind, open_regular_file

MAX_IMAGE_PIXELS_ENV = "OPTIMIZED_SD_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default (about a 9459x9459 image: 256 MiB of RGBA)


def max_image_pixels(limit: int | None = None) -> int:
    """The largest image (in pixels) that is decoded: `limit`, else $OPTIMIZED_SD_MAX_IMAGE_PIXELS,
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


def check_regular_file(path: Path | str, what: str) -> None:
    """`what` (e.g. "mask") at `path` must be a regular file: "not found", or "is a FIFO, not a regular file"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as error:
        raise UserError(f"{what} {path} cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is a {_file_kind(mode)}, not a regular file")


def read_image(
    path: Path | str, what: str, convert: Callable[[Image.Image], Image.Image], max_pixels: int | None = None, raise_with: str = ""
) -> Image.Image:
    """`convert(image)` of the image file at `path`, decoded only when it declares at most `max_pixels`
    (see `max_image_pixels`; `raise_with` names the field that raises the limit: a FieldError then names it).

    Every failure inside PIL is this file's problem, whatever PIL raises for it (a corrupt PNG chunk
    raises SyntaxError, an unknown DDS pixel format NotImplementedError, a truncated file OSError),
    so each becomes a UserError naming the file. PIL's DecompressionBombWarning is replaced by the
    pixel check (same default limit, configurable); PIL's own hard limit (twice its default) stays an error."""
    limit = max_image_pixels(max_pixels)
    check_regular_file(path, what)
    try:
        handle = open_regular_file(Path(path))  # checked again on the open descriptor: nothing swapped in can block
    except CheckpointError as error:
        raise UserError(f"{what} {error}") from None
    try:
        with handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below refuses it, with our limit
            with Image.open(handle) as opened:
                pixels = opened.width * opened.height
                if pixels > limit:
                    how = f"raise it (or ${MAX_IMAGE_PIXELS_ENV})" if raise_with else f"raise it with ${MAX_IMAGE_PIXELS_ENV}"
                    size = f"{opened.width}x{opened.height} ({pixels:,} pixels)"
                    problem = f"{what} {path} is {size}, over the limit of {limit:,}; {how} if the file is trusted"
                    raise FieldError.about(raise_with, f"limit passed: {problem}") if raise_with else UserError(problem)
                opened.load()
                return convert(opened)
    except UserError:
        raise
    except Image.DecompressionBombError:
        hard_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise UserError(f"{what} {path} declares more pixels than PIL ever decodes (over {hard_limit:,}); refused") from None
    except MemoryError:
        raise UserError(f"{what} {path} does not fit in memory") from None
    except Exception as error:  # noqa: BLE001 - the PIL boundary: any decoder failure is a bad file
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{what} {path} is not a readable image: {detail}") from None

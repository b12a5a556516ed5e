"""Inpainting masks and canvases as PIL images: reading a mask, blurring it, the "only masked" crop,
the outpainting canvas, and pasting a generated region back. Pure functions: no model, no torch.

Conventions (AUTOMATIC1111's and diffusers'): white (255) is repainted, black (0) is kept.
A mask is read as
  * L, 1, I, F, RGB, CMYK, ...: luminance (PIL's `convert("L")`);
  * RGBA, LA, PA, or P with a transparent colour: its alpha when the alpha is not all opaque (opaque =
    repainted, transparent = kept: a brush drawn on a transparent layer, as AUTOMATIC1111 reads
    uploaded masks), else luminance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from optimized_sd.errors import FieldError, UserError
from optimized_sd.pipelines.bounds import check_numbers
from optimized_sd.pipelines.defaults import DEFAULT_MASK_BLUR, DEFAULT_MASKED_CONTENT, DEFAULT_PADDING
from optimized_sd.pipelines.image_files import read_image

log = logging.getLogger("optimized_sd")

INPAINT_AREAS = ("whole", "masked")
# What the masked part starts from (AUTOMATIC1111's "Masked content"): the image under it ("original"),
# the surrounding colours ("fill", `fill_masked`), or, in latent space, the start noise or zeros.
MASKED_CONTENT = ("original", "fill", "latent-noise", "latent-nothing")
OUTPAINT_NOISE = 24.0  # std (0-255 levels) of the noise added to the edge colours filling an outpainted border
OUTPAINT_NOISE_SEED = 0  # fixed: the same image and flags give the same canvas


def mask_luminance(image: Image.Image) -> Image.Image:
    """Any PIL image -> an L mask by the rules of the module docstring."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return image.convert("L")


def load_mask(mask: Image.Image | Path | str) -> Image.Image:
    """Open a mask (a path or a PIL image) as an L image; UserError when it is not a readable image file."""
    if isinstance(mask, Image.Image):
        return mask_luminance(mask)
    return read_image(mask, "mask", mask_luminance)


def fit_mask(mask: Image.Image, size: tuple[int, int], invert: bool = False) -> Image.Image:
    """The L mask at `size` (W, H), resized with a warning when it differs, inverted on request."""
    if mask.size != size:
        log.warning("the mask is %dx%d, the image %dx%d; the mask was resized to the image", *mask.size, *size)
        mask = mask.resize(size, Image.LANCZOS)
    return Image.eval(mask, lambda v: 255 - v) if invert else mask


def check_mask(mask: Image.Image) -> None:
    """A mask with no white pixel repaints nothing: say so rather than return the image unchanged."""
    if mask.getextrema()[1] == 0:
        raise UserError("the mask is all black: nothing to repaint (white marks what is repainted; inverting the mask swaps them)")


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur of std `radius` pixels (AUTOMATIC1111's --mask-blur): soft edges for the paste-back.
    The radius is validated with the request (`bounds`); here it is also clamped to the image's diagonal
    (a wider blur changes nothing visible) because Pillow crashes the process on huge radii, NaN and inf."""
    check_numbers(mask_blur=radius)
    radius = min(float(radius), math.hypot(*mask.size))
    assert math.isfinite(radius)
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with its masked part (mask >= 128) painted in the colours around it, smoothly:
    "pull-push" hole filling (Gortler et al., The Lumigraph, 1996), the pixels outside unchanged.
    AUTOMATIC1111's "fill" does the same job by compositing ever finer blurs of the kept pixels."""
    keep = (np.asarray(mask.convert("L")) < 128).astype(np.float32)  # (H, W), 1 where kept
    if keep.min() == 1 or keep.max() == 0:
        return image.convert("RGB")  # nothing to fill, or no colour to fill it with
    colours = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    filled = pull_push(colours, keep)
    return Image.fromarray(np.clip(filled, 0, 255).round().astype(np.uint8))


def pull_push(colours: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(H, W, C) colours known with (H, W) weights in [0, 1] -> every pixel coloured. Pull: halve the
    grid, each coarse pixel the weighted mean of its 2x2 block, its weight their sum capped at 1;
    recurse; push: each fine pixel keeps its colour by its weight, the rest from the coarser level
    upsampled bilinearly. A hole is thus filled from the nearest known colours at every scale."""
    height, width = weights.shape
    if weights.min() >= 1.0 or (height == 1 and width == 1):
        return colours
    even_h, even_w = height + height % 2, width + width % 2  # odd sides padded with weight 0
    weighted = np.zeros((even_h, even_w, colours.shape[2]), dtype=np.float32)
    weighted[:height, :width] = colours * weights[..., None]
    padded = np.zeros((even_h, even_w), dtype=np.float32)
    padded[:height, :width] = weights
    block_colours = weighted.reshape(even_h // 2, 2, even_w // 2, 2, -1).sum(axis=(1, 3))  # (h/2, w/2, C)
    block_weights = padded.reshape(even_h // 2, 2, even_w // 2, 2).sum(axis=(1, 3))  # (h/2, w/2)
    coarse = block_colours / np.maximum(block_weights, 1e-8)[..., None]
    coarse = pull_push(coarse, np.minimum(block_weights, 1.0))
    upsampled = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c], "F").resize((even_w, even_h), Image.BILINEAR)) for c in range(coarse.shape[2])],
        axis=-1,
    )[:height, :width]  # (H, W, C)
    return weights[..., None] * colours + (1.0 - weights[..., None]) * upsampled


# -- outpainting --------------------------------------------------------------------------------


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """'LEFT,RIGHT,TOP,BOTTOM' pixels -> a tuple; UserError unless four whole numbers >= 0, one > 0."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise FieldError.about("outpaint", f"takes LEFT,RIGHT,TOP,BOTTOM pixels (four whole numbers >= 0), got {text!r}")
    if max(values) == 0:
        raise FieldError.about("outpaint", "0,0,0,0 adds no border: nothing to paint")
    return values  # type: ignore[return-value]


def outpaint_canvas(image: Image.Image, border: tuple[int, int, int, int], blur: float) -> tuple[Image.Image, Image.Image]:
    """The image on a canvas grown by (left, right, top, bottom) pixels, and the mask to repaint.

    The new border is filled with the colour of the nearest edge pixel of the image (edge replication)
    plus Gaussian noise of std OUTPAINT_NOISE levels drawn with a fixed seed: the model then sees
    the scene's colours to continue, with texture to work on. The mask is white over the new border
    and, with `blur` > 0, ramps linearly from white to black over `blur` pixels inward from each
    grown edge, so the seam falls inside the old image and is blended there (not over the new area)."""
    left, right, top, bottom = border
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    filled = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    new_area = np.ones(filled.shape[:2], dtype=bool)
    height, width = pixels.shape[:2]
    new_area[top : top + height, left : left + width] = False
    noise = np.random.default_rng(OUTPAINT_NOISE_SEED).normal(0.0, OUTPAINT_NOISE, filled.shape).astype(np.float32)
    filled = np.where(new_area[..., None], np.clip(filled + noise, 0, 255), filled)
    canvas = Image.fromarray(filled.round().astype(np.uint8))
    mask = new_area.astype(np.float32)
    if blur > 0:
        # Distance (in pixels, from 1 at the grown edge) into the old image from each side that grew.
        ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
        distances = [d for d, grown in ((xs + 1, left), (width - xs, right), (ys + 1, top), (height - ys, bottom)) if grown]
        ramp = np.zeros((height, width), dtype=np.float32)
        for distance in distances:
            ramp = np.maximum(ramp, np.clip(1.0 - (distance - 1) / blur, 0.0, 1.0))
        mask[top : top + height, left : left + width] = ramp
    return canvas, Image.fromarray((mask * 255).round().astype(np.uint8))


# -- "inpaint only masked" -----------------------------------------------------------------------


Box = tuple[int, int, int, int]  # (left, top, right, bottom), PIL's crop box


def crop_box(mask: Image.Image, padding: int, target: tuple[int, int]) -> Box:
    """AUTOMATIC1111's "only masked" region: the bounding box of the mask's non-black pixels plus
    `padding` pixels on each side, grown (centred, then shifted to stay inside the image) to the
    aspect ratio of `target` (W, H), so resizing it to the generation size does not stretch it.
    Where the image is too small for that ratio the box is the image's whole extent on that axis."""
    if padding < 0:
        raise FieldError.about("padding", f"must be 0 or more, got {padding}")
    bbox = mask.getbbox()
    if bbox is None:
        raise UserError("the mask is all black: nothing to repaint")
    image_w, image_h = mask.size
    left, top, right, bottom = bbox
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, image_w), min(bottom + padding, image_h)
    ratio = target[0] / target[1]
    width, height = right - left, bottom - top
    if width / height < ratio:
        left, right = _grow(left, right, round(height * ratio), image_w)
    else:
        top, bottom = _grow(top, bottom, round(width / ratio), image_h)
    return left, top, right, bottom


def _grow(start: int, end: int, size: int, limit: int) -> tuple[int, int]:
    """[start, end) grown to `size` about its centre, shifted back inside [0, limit), capped at `limit`."""
    size = min(size, limit)
    start = max(0, min(start - (size - (end - start)) // 2, limit - size))
    return start, start + size


@dataclass(frozen=True)
class Canvas:
    """Where a generated image goes back: the full-size image the user sees (`image`, outpainting's
    grown canvas included), the blurred mask at that size, and the box that was generated."""

    image: Image.Image
    mask: Image.Image
    box: Box

    def paste(self, generated: Image.Image) -> Image.Image:
        """The generated (W, H) image resized to the box and blended into the canvas by the blurred
        mask: pixels the mask leaves black are the canvas's own, exactly."""
        left, top, right, bottom = self.box
        region = generated.convert("RGB")
        if region.size != (right - left, bottom - top):
            region = region.resize((right - left, bottom - top), Image.LANCZOS)
        original = self.image.crop(self.box)
        out = self.image.copy()
        out.paste(Image.composite(region, original, self.mask.crop(self.box)), (left, top))
        return out


@dataclass(frozen=True)
class Region:
    """What one inpainting call generates: `image` and its blurred `mask` at the generation size,
    and the `canvas` the result is pasted back into."""

    image: Image.Image
    mask: Image.Image
    canvas: Canvas


@dataclass(frozen=True)
class InpaintOptions:
    """What turns an image-to-image request into inpainting (or outpainting). `mask`: a path or a
    PIL image in any mode (read by `load_mask`); `area`: "whole" generates the whole (outpainted)
    image, "masked" only the mask's bounding box plus `padding` pixels, at the generation size
    (AUTOMATIC1111's "inpaint only masked"); `outpaint`: (left, right, top, bottom) pixels to grow
    the canvas by, the new border being repainted (a mask is then optional); `masked_content`:
    what the masked part starts from (one of MASKED_CONTENT; "fill" is applied to the region's
    pixels here, the latent ones by the inpaint task; at strength 1 a 4-channel model starts the
    masked part from pure noise whatever it says)."""

    mask: Image.Image | Path | str | None = None
    invert_mask: bool = False
    mask_blur: float = DEFAULT_MASK_BLUR
    area: str = "whole"
    padding: int = DEFAULT_PADDING
    outpaint: tuple[int, int, int, int] | None = None
    masked_content: str = DEFAULT_MASKED_CONTENT

    def check(self) -> None:
        """What can be checked without the images."""
        if self.area not in INPAINT_AREAS:
            raise FieldError.about("area", f"{self.area!r} is unknown; use whole or masked")
        if self.masked_content not in MASKED_CONTENT:
            raise FieldError.about("masked_content", f"{self.masked_content!r} is unknown; use one of {', '.join(MASKED_CONTENT)}")
        if self.mask is None and self.outpaint is None:
            problem = "is missing: inpainting needs a mask or a border to paint (outpaint)"
            raise FieldError("mask", "inpainting needs a mask or a border to paint (outpaint)", problem)
        check_numbers(mask_blur=self.mask_blur, padding=self.padding)
        if self.outpaint is not None:
            if len(self.outpaint) != 4 or max(self.outpaint) == 0:
                raise FieldError.about("outpaint", f"takes (left, right, top, bottom) pixels >= 0, one of them > 0; got {self.outpaint}")
            for side in self.outpaint:
                check_numbers(outpaint=side)

    def generation_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(W, H) to generate at when none is given: "whole": the (outpainted) canvas floored to a
        multiple of 64, as img2img's init image (the LDM UNet halves the latents three times);
        "masked": 512 x 512, AUTOMATIC1111's default, the region being scaled to it."""
        if self.area == "masked":
            return 512, 512
        left, right, top, bottom = self.outpaint or (0, 0, 0, 0)
        width, height = image_size[0] + left + right, image_size[1] + top + bottom
        if width < 64 or height < 64:
            raise UserError(f"the image is {width}x{height}; inpainting needs at least 64x64")
        return width - width % 64, height - height % 64


def prepare_region(image: Image.Image, size: tuple[int, int], options: InpaintOptions) -> Region:
    """Image + options -> the region to generate at `size` (W, H) and where it goes back.

    The mask (read by `load_mask`, fitted to the image, inverted on request) is blurred by
    `mask_blur` pixels; outpainting grows the canvas and adds the new border to the mask (the
    user's mask, if any, still applies to the old image). "whole" generates the whole canvas resized
    to `size`; "masked" the mask's padded bounding box resized to `size`. With masked_content
    "fill" the region's masked pixels are replaced by the colours around them (`fill_masked`)."""
    options.check()
    image = image.convert("RGB")
    user_mask = None
    if options.mask is not None:
        user_mask = fit_mask(load_mask(options.mask), image.size, options.invert_mask)
        if options.outpaint is None:
            check_mask(user_mask)
        user_mask = blur_mask(user_mask, options.mask_blur)
    if options.outpaint is not None:
        canvas_image, soft = outpaint_canvas(image, options.outpaint, options.mask_blur)
        if user_mask is not None:
            placed = Image.new("L", canvas_image.size, 0)
            placed.paste(user_mask, (options.outpaint[0], options.outpaint[2]))
            soft = Image.fromarray(np.maximum(np.asarray(soft), np.asarray(placed)))
    else:
        assert user_mask is not None
        canvas_image, soft = image, user_mask
    box = crop_box(soft, options.padding, size) if options.area == "masked" else (0, 0, *canvas_image.size)
    canvas = Canvas(canvas_image, soft, box)
    region_image, region_mask = canvas_image.crop(box), soft.crop(box)
    if region_image.size != size:
        region_image, region_mask = region_image.resize(size, Image.LANCZOS), region_mask.resize(size, Image.LANCZOS)
    if options.masked_content == "fill":
        region_image = fill_masked(region_image, region_mask)
    return Region(region_image, region_mask, canvas)

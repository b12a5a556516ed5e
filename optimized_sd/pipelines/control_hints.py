"""Control images made ready for a ControlNet: fitted to the output size by AUTOMATIC1111's resize modes, then
run through a preprocessor (`none`, `invert`, `canny`).

Canny is implemented here (OpenCV is not a dependency): Sobel 3x3 gradients, the L1 magnitude |gx| + |gy| of
the strongest colour channel, non-maximum suppression over four directions, a double threshold and hysteresis
over 8-connected pixels, which is what `cv2.Canny(image, low, high)` (what AUTOMATIC1111's canny calls) computes.
It approximates OpenCV's: the border rule and ties in the suppression may differ on a few pixels. OpenCV does not
blur first; `smooth=True` adds the textbook 5x5 Gaussian (sigma 1.4) before the gradients."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PREPROCESSORS = ("none", "invert", "canny")
RESIZE_MODES = ("crop", "resize", "fill")  # "Crop and Resize", "Just Resize", "Resize and Fill"
CANNY_LOW, CANNY_HIGH = 100, 200  # AUTOMATIC1111's canny thresholds
TAN_22_5 = 0.4142135623730951


def fit_image(image: Image.Image, width: int, height: int, mode: str = "crop") -> Image.Image:
    """`image` as width x height by AUTOMATIC1111's resize mode: "resize" stretches it; "crop" scales it to cover
    the frame and cuts the centre out; "fill" scales it to fit inside and fills the borders with the median
    colour of the image's edge pixels (as the ControlNet extension does)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    image = image.convert("RGB")
    if mode == "resize" or image.size == (width, height):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratios = (width / image.width, height / image.height)
    scale = max(ratios) if mode == "crop" else min(ratios)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    scaled = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    if mode == "crop":
        return scaled.crop((left, top, left + width, top + height))
    pixels = np.asarray(image)
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in np.median(edges, axis=0)))
    canvas.paste(scaled, (-left, -top))
    return canvas


def gaussian_5x5(planes: torch.Tensor, sigma: float = 1.4) -> torch.Tensor:
    """(C, H, W) float planes blurred by a normalised 5x5 Gaussian, borders replicated."""
    offsets = torch.arange(-2, 3, dtype=planes.dtype)
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(line, line) / torch.outer(line, line).sum()
    padded = F.pad(planes[:, None], (2, 2, 2, 2), mode="replicate")
    return F.conv2d(padded, kernel[None, None])[:, 0]


def sobel(planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gx, gy) of (C, H, W) planes by the 3x3 Sobel kernels, borders reflected (OpenCV's BORDER_REFLECT_101)."""
    gx_kernel = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=planes.dtype)
    kernels = torch.stack([gx_kernel, gx_kernel.t()])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    padded = F.pad(planes[:, None], (1, 1, 1, 1), mode="reflect")
    gradients = F.conv2d(padded, kernels)  # (C, 2, H, W)
    return gradients[:, 0], gradients[:, 1]


def non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The magnitude where it is a maximum across the edge (along the gradient, in one of four directions:
    horizontal, vertical or a diagonal); 0 elsewhere."""
    padded = F.pad(magnitude[None, None], (1, 1, 1, 1))[0, 0]
    height, width = magnitude.shape

    def at(dy: int, dx: int) -> torch.Tensor:
        return padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    ax, ay = gx.abs(), gy.abs()
    horizontal = ay <= ax * TAN_22_5  # the gradient points along x: compare left and right
    vertical = ay * TAN_22_5 > ax
    same_sign = (gx * gy) > 0
    # A pixel must beat one neighbour strictly and the other at least (OpenCV's rule, so plateaus keep one pixel).
    keep = torch.where(
        horizontal,
        (magnitude > at(0, -1)) & (magnitude >= at(0, 1)),
        torch.where(
            vertical,
            (magnitude > at(-1, 0)) & (magnitude >= at(1, 0)),
            torch.where(
                same_sign,
                (magnitude > at(-1, -1)) & (magnitude >= at(1, 1)),
                (magnitude > at(-1, 1)) & (magnitude >= at(1, -1)),
            ),
        ),
    )
    return torch.where(keep, magnitude, torch.zeros_like(magnitude))


def hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Strong pixels plus every weak pixel 8-connected to one through weak pixels (grown until nothing changes)."""
    edges = strong.clone()
    candidates = weak | strong
    while True:
        grown = F.max_pool2d(edges[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & candidates
        if torch.equal(grown, edges):
            return edges
        edges = grown


def canny(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH, smooth: bool = False) -> Image.Image:
    """Canny edges (Canny 1986) of an RGB image as a white-on-black RGB image; thresholds on the L1 gradient
    magnitude of 8-bit pixels, as `cv2.Canny` (see the module docstring)."""
    if low > high:
        low, high = high, low
    planes = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64)).permute(2, 0, 1)  # (3, H, W)
    if smooth:
        planes = gaussian_5x5(planes)
    gx, gy = sobel(planes)
    per_channel = gx.abs() + gy.abs()
    strongest = per_channel.argmax(0, keepdim=True)  # OpenCV keeps the channel with the largest magnitude
    magnitude = per_channel.gather(0, strongest)[0]
    gx, gy = gx.gather(0, strongest)[0], gy.gather(0, strongest)[0]
    thin = non_maximum_suppression(magnitude, gx, gy)
    edges = hysteresis(thin > high, thin > low)
    array = edges.numpy().astype(np.uint8) * 255
    return Image.fromarray(np.stack([array] * 3, axis=-1))


def preprocess(image: Image.Image, preprocessor: str = "none", low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """The control image through a preprocessor: "none" as given, "invert" (white lines on black from a
    drawing's black on white), "canny" edges."""
    if preprocessor == "none":
        return image.convert("RGB")
    if preprocessor == "invert":
        return Image.fromarray(255 - np.asarray(image.convert("RGB")))
    if preprocessor == "canny":
        return canny(image, low, high)
    raise ValueError(f"unknown preprocessor {preprocessor!r}; expected one of {', '.join(PREPROCESSORS)}")


def hint_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [0, 1], the range ControlNets take their hint in."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()

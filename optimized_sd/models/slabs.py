"""Row-slab evaluation of the VAE's full-resolution layers: the same numbers, a fraction of the memory.

At 512x512 the VAE decoder's last levels hold 128-256 channels at full resolution, and the plain
`conv(silu(norm(x)))` keeps three such tensors alive at once (x for the shortcut, the normalised
copy, its SiLU). Group statistics are global, but once they are known GroupNorm is a per-channel
affine map, so the normalise -> SiLU -> 3x3 conv chain can run a band of rows at a time (with a
one-row halo) into a preallocated output. Nearest x2 upsampling followed by a conv is done the same
way (`NearestUpConv2d`), so the 4x-larger upsampled tensor never exists whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimized_sd.models import ops

SLAB_BYTES = 16 * 2**20  # activation bytes per band; small enough to be cheap, large enough to be fast
PHASE_CONV_DEVICES = {"cpu"}  # where NearestUpConv2d runs as phase convs (measured there; CUDA owed a measurement)
# Below this many input pixels folding the kernels costs more than the convs save (the UNet's 8x8 level at
# 512: 2.0x slower; 16x16: 0.80x; benchmarks/phase_conv.py).
PHASE_CONV_MIN_PIXELS = 16 * 16


def slab_rows(x: Tensor, channels: int, scale: int = 1) -> int:
    """Output rows per band so one band of `channels` output channels stays near SLAB_BYTES."""
    row_bytes = x.shape[0] * channels * x.shape[-1] * scale * x.element_size()
    return max(8, SLAB_BYTES // max(1, row_bytes))


def group_affine(x: Tensor, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
    """Per (batch, channel) scale and shift, float32, that equal `norm(x)` as x * scale + shift.
    Statistics are taken one group at a time so an fp16 input is never copied to fp32 whole."""
    batch, channels = x.shape[:2]
    groups = norm.num_groups
    per_group = channels // groups
    means, rstds = [], []
    for g in range(groups):
        chunk = x[:, g * per_group : (g + 1) * per_group].float()
        var, mean = torch.var_mean(chunk.reshape(batch, -1), dim=1, unbiased=False)
        means.append(mean)
        rstds.append(torch.rsqrt(var + norm.eps))
    mean = torch.stack(means, dim=1).repeat_interleave(per_group, dim=1)  # (B, C)
    rstd = torch.stack(rstds, dim=1).repeat_interleave(per_group, dim=1)
    scale = rstd * norm.weight.float()[None]
    shift = norm.bias.float()[None] - mean * scale
    return scale[:, :, None, None], shift[:, :, None, None]


def norm_silu_conv(x: Tensor, norm: nn.GroupNorm, conv: nn.Conv2d, *, in_place: bool = False) -> Tensor:
    """conv(silu(norm(x))) for a 3x3, stride-1, padding-1 conv, computed in bands of rows.

    `in_place` writes the result over `x` (same channel count), so no second full-size tensor exists:
    bands run top to bottom, and the one input row a band needs that the previous band has already
    overwritten (its upper halo) is kept aside before the overwrite."""
    scale, shift = group_affine(x, norm)
    height = x.shape[2]
    if in_place and conv.in_channels != conv.out_channels:
        raise ValueError("an in-place conv keeps the channel count")
    out = x if in_place else x.new_empty((x.shape[0], conv.out_channels, height, x.shape[3]))
    rows = slab_rows(x, max(conv.in_channels, conv.out_channels))
    overwritten_row: Tensor | None = None  # in place: the input row just above the current band
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        lo, hi = max(0, top - 1), min(height, bottom + 1)  # one-row halo
        rows_in = x[:, :, lo:hi] if overwritten_row is None else torch.cat([overwritten_row, x[:, :, top:hi]], dim=2)
        band = F.silu(torch.addcmul(shift, rows_in.float(), scale), inplace=True).to(x.dtype)
        result = conv_rows(band, conv, top - lo, bottom - top)
        if in_place:
            overwritten_row = x[:, :, bottom - 1 : bottom].clone()
        out[:, :, top:bottom] = result
    return out


def add_rows(out: Tensor, x: Tensor, projection: nn.Module) -> Tensor:
    """out += projection(x) for a per-pixel projection (identity or 1x1 conv), a band of rows at a
    time, so the projected tensor never exists whole."""
    rows = slab_rows(x, max(x.shape[1], out.shape[1]))
    for top in range(0, x.shape[2], rows):
        out[:, :, top : top + rows] += projection(x[:, :, top : top + rows])
    return out


def conv_rows(band: Tensor, conv: nn.Conv2d, first: int, count: int) -> Tensor:
    """The 3x3 conv of a band that carries its halo rows, keeping `count` rows from `first`. The conv
    pads every side with zeros; the padded rows matter only where the band ends at the image edge,
    which is exactly where zeros are right, and elsewhere they fall in the halo that is dropped. The
    module itself runs the conv, so its weights reach compute through the op layer (`models/ops.py`)."""
    if conv.stride != (1, 1) or conv.padding != (1, 1):
        raise ValueError("a row band runs a 3x3 conv with stride 1 and padding 1")
    return conv(band)[:, :, first : first + count]


def phase_kernels(weight: Tensor) -> list[list[Tensor]]:
    """A 3x3 kernel (O, C, 3, 3) applied after nearest x2 upsampling, as four 2x2 kernels on the input:
    `[a][b]` makes the output pixels (2i + a, 2j + b). Each output pixel's 3x3 window covers only 2x2
    distinct input pixels, so the taps that land on the same one are summed: phase 0 reads rows (i - 1, i)
    with taps (0, 1 + 2), phase 1 rows (i, i + 1) with (0 + 1, 2); the same for columns."""

    def fold(kernel: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        first, middle, last = kernel.unbind(dim)
        return torch.stack([first, middle + last], dim), torch.stack([first + middle, last], dim)

    return [list(fold(rows, 3)) for rows in fold(weight, 2)]


class NearestUpConv2d(ops.Conv2d):
    """A 3x3, padding-1 conv of the nearest-x2 upsampling of its input, which is never built whole. Keys,
    weights and the op layer are a plain conv's (`compute_weight` serves LoRA and stored weights alike).

    Where `PHASE_CONV_DEVICES` has the device and the input has PHASE_CONV_MIN_PIXELS, as four 2x2 convs at
    the input's resolution (`phase_kernels`): 16 taps per input pixel instead of 36, the same sums up to
    rounding (relative error ~1e-6); 0.41-0.80x the time of upsample-then-conv on the CPU for SD's layers
    (`benchmarks/phase_conv.py`). Elsewhere upsample then conv.
    `banded`: a band of rows at a time (SLAB_BYTES; the VAE's full-resolution levels), else whole."""

    def __init__(self, channels: int, *, banded: bool) -> None:
        super().__init__(channels, channels, 3, padding=1)
        self.banded = banded

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.compute_weight(x.dtype), self.compute_bias()
        batch, _, height, width = x.shape
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty((batch, self.out_channels, 2 * height, 2 * width), dtype=x.dtype, device=x.device, memory_format=layout)
        rows = max(1, slab_rows(x, max(self.in_channels, self.out_channels), scale=2) // 2) if self.banded else height
        phased = x.device.type in PHASE_CONV_DEVICES and height * width >= PHASE_CONV_MIN_PIXELS
        kernels = phase_kernels(weight) if phased else None
        pixels = out.unflatten(3, (width, 2)).unflatten(2, (height, 2))  # (B, O, h, a, w, b): pixel (2i + a, 2j + b)
        for top in range(0, height, rows):  # input rows [top, bottom) make output rows [2 top, 2 bottom)
            bottom = min(height, top + rows)
            lo, hi = max(0, top - 1), min(height, bottom + 1)  # one input row of halo each side, zeros past the edge
            band = x[:, :, lo:hi]
            if kernels is None:
                upsampled = F.interpolate(band, scale_factor=2.0, mode="nearest")
                first = 2 * (top - lo)
                out[:, :, 2 * top : 2 * bottom] = F.conv2d(upsampled, weight, bias, padding=1)[:, :, first : first + 2 * (bottom - top)]
                continue
            band = F.pad(band, (1, 1, 1 - (top - lo), 1 - (hi - bottom)))  # input rows top - 1 .. bottom, columns -1 .. width
            for a in (0, 1):
                for b in (0, 1):
                    window = band[:, :, a : a + bottom - top + 1, b : b + width + 1]
                    pixels[:, :, top:bottom, a, :, b] = F.conv2d(window, kernels[a][b], bias)
        return out

"""Row-slab evaluation of the VAE's full-resolution layers: the same numbers, a fraction of the memory.

At 512x512 the VAE decoder's last levels hold 128-256 channels at full resolution, and the plain
`conv(silu(norm(x)))` keeps three such tensors alive at once (x for the shortcut, the normalised
copy, its SiLU). Group statistics are global, but once they are known GroupNorm is a per-channel
affine map, so the normalise -> SiLU -> 3x3 conv chain can run a band of rows at a time (with a
one-row halo) into a preallocated output. Nearest x2 upsampling followed by a conv is done the same
way, so the 4x-larger upsampled tensor never exists whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SLAB_BYTES = 16 * 2**20  # activation bytes per band; small enough to be cheap, large enough to be fast


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


def upsample_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(nearest_upsample_x2(x)) for a 3x3 padding-1 conv, band by band of output rows."""
    height = x.shape[2] * 2
    out = x.new_empty((x.shape[0], conv.out_channels, height, x.shape[3] * 2))
    rows = max(2, slab_rows(x, max(conv.in_channels, conv.out_channels), scale=2) // 2 * 2)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        lo, hi = max(0, top - 1), min(height, bottom + 1)  # upsampled rows needed, with halo
        band = F.interpolate(x[:, :, lo // 2 : (hi + 1) // 2], scale_factor=2.0, mode="nearest")
        start = lo - (lo // 2) * 2  # the band may begin one upsampled row early
        out[:, :, top:bottom] = conv_rows(band, conv, start + top - lo, bottom - top)
    return out

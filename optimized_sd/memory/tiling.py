"""Apply an image-to-image function tile by tile and blend the overlaps, to cap peak memory.

Generic: it knows only that `fn` maps (B, C, h, w) to (B, C', h*scale, w*scale). The VAE
decoder (scale 8) and encoder (scale 1/8) are the intended users; peak activation memory then
follows the tile size instead of the image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def tile_layout(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), neighbours sharing >= `overlap`.

    Tiles step by `tile - overlap`; the last one is shifted inward to end exactly at `size`
    (so every tile is full size, and it overlaps its neighbour by at least `overlap`).
    An axis no longer than one tile gets the single start 0.
    """
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile; got tile={tile}, overlap={overlap}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts: list[int] = []
    start = 0
    while start + tile < size:
        starts.append(start)
        start += stride
    starts.append(size - tile)
    return starts


def _scaled(n: int, scale: float, what: str) -> int:
    """n * scale as an int, refusing positions that fall between output pixels."""
    value = n * scale
    rounded = round(value)
    if not math.isclose(value, rounded, abs_tol=1e-6):
        raise ValueError(
            f"{what} {n} * scale {scale} = {value} is not a whole output pixel; "
            "choose tile, overlap and size as multiples of 1/scale"
        )
    return int(rounded)


def _axis_weights(
    starts: list[int], length: int, scale: float, device: torch.device
) -> list[Tensor]:
    """Per-tile 1-D blend weights in output pixels: linear ramps across each actual overlap.

    Ramps use (i + 0.5) / n so weights are never zero inside a tile and two neighbours' ramps
    over the same span sum to 1. The overlap is measured per pair, so the shifted last tile
    (which overlaps more than `overlap`) ramps across its whole shared span.
    """
    out_len = _scaled(length, scale, "tile")
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(out_len, dtype=torch.float32, device=device)
        if i > 0:
            shared = _scaled(starts[i - 1] + length - start, scale, "overlap")
            if shared > 0:
                ramp = (torch.arange(shared, dtype=torch.float32, device=device) + 0.5) / shared
                w[:shared] *= ramp
        if i < len(starts) - 1:
            shared = _scaled(start + length - starts[i + 1], scale, "overlap")
            if shared > 0:
                ramp = (torch.arange(shared, dtype=torch.float32, device=device) + 0.5) / shared
                w[out_len - shared :] *= ramp.flip(0)
        weights.append(w)
    return weights


def tiled_apply(
    fn: Callable[[Tensor], Tensor], x: Tensor, *, tile: int, overlap: int, scale: float
) -> Tensor:
    """fn(x) computed on overlapping tiles of x, one at a time, blended with linear ramps.

    x: (B, C, H, W); `tile` and `overlap` are in input pixels; fn maps (B, C, h, w) to
    (B, C', h*scale, w*scale). Input no larger than a tile is a single fn call.

    Blending is a running weighted mean: for each tile, wsum += w and out.lerp_(y, w / wsum).
    Where overlapping tiles agree, lerp leaves the value bit-for-bit unchanged, so a local fn
    (pointwise, nearest upsampling) gives exactly fn(x). Half-precision outputs are blended in
    float32 and cast back at the end.
    """
    if x.dim() != 4:
        raise ValueError(f"tiled_apply wants (B, C, H, W); got shape {tuple(x.shape)}")
    if scale <= 0:
        raise ValueError(f"scale must be positive; got {scale}")
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile; got tile={tile}, overlap={overlap}")
    b, _c, height, width = x.shape
    if height <= tile and width <= tile:
        return fn(x)

    # An axis shorter than a tile is one full-length tile (layout [0]).
    tile_h, tile_w = min(tile, height), min(tile, width)
    ys = tile_layout(height, tile_h, min(overlap, tile_h - 1))
    xs = tile_layout(width, tile_w, min(overlap, tile_w - 1))
    out_h, out_w = _scaled(height, scale, "height"), _scaled(width, scale, "width")
    wy = _axis_weights(ys, tile_h, scale, x.device)
    wx = _axis_weights(xs, tile_w, scale, x.device)
    th, tw = _scaled(tile_h, scale, "tile"), _scaled(tile_w, scale, "tile")

    out: Tensor | None = None
    out_dtype: torch.dtype | None = None
    wsum = torch.zeros(out_h, out_w, dtype=torch.float32, device=x.device)  # (H', W')
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            y = fn(x[:, :, y0 : y0 + tile_h, x0 : x0 + tile_w])  # (B, C', th, tw)
            if y.dim() != 4 or y.shape[0] != b or tuple(y.shape[2:]) != (th, tw):
                raise ValueError(
                    f"fn mapped a ({tile_h}, {tile_w}) tile to {tuple(y.shape)}; expected "
                    f"({b}, C', {th}, {tw}) for scale {scale}"
                )
            if out is None:
                out_dtype = y.dtype
                acc_dtype = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
                out = torch.zeros(b, y.shape[1], out_h, out_w, dtype=acc_dtype, device=x.device)
            oy, ox = _scaled(y0, scale, "offset"), _scaled(x0, scale, "offset")
            w = wy[iy][:, None] * wx[ix][None, :]  # (th, tw)
            region_w = wsum[oy : oy + th, ox : ox + tw]
            region_w += w
            ratio = (w / region_w).to(out.dtype)  # 1 exactly where this tile is the first
            out[:, :, oy : oy + th, ox : ox + tw].lerp_(y.to(out.device, out.dtype), ratio)
            del y
    assert out is not None and out_dtype is not None
    return out.to(out_dtype)

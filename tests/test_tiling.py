"""Tiled apply: the layout covers each axis, and blending reproduces the untiled result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimized_sd.memory.tiling import tile_layout, tiled_apply


# --------------------------------------------------------------------------- tile_layout
def test_tile_layout_examples() -> None:
    assert tile_layout(100, 40, 10) == [0, 30, 60]
    assert tile_layout(90, 40, 10) == [0, 30, 50]  # last tile shifted inward, overlap 20
    assert tile_layout(40, 40, 10) == [0]
    assert tile_layout(17, 40, 10) == [0]  # smaller than a tile: one call
    assert tile_layout(80, 40, 0) == [0, 40]


@pytest.mark.parametrize("size", [1, 8, 39, 40, 41, 64, 100, 257, 1000])
@pytest.mark.parametrize(("tile", "overlap"), [(40, 0), (40, 8), (40, 20), (40, 39), (64, 16)])
def test_tile_layout_covers_axis_with_overlap(size: int, tile: int, overlap: int) -> None:
    starts = tile_layout(size, tile, overlap)
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if size <= tile:
        assert starts == [0]
        return
    assert all(0 <= s and s + tile <= size for s in starts)  # every tile full size, inside
    assert starts[-1] + tile == size  # reaches the end
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap  # neighbours share at least `overlap`
        assert b - a >= 1
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s : s + tile] = True
    assert bool(covered.all())
    # Minimal: no more tiles than stepping by tile - overlap needs.
    assert len(starts) == -(-(size - overlap) // (tile - overlap))


@pytest.mark.parametrize(("tile", "overlap"), [(0, 0), (8, 8), (8, 9), (8, -1)])
def test_tile_layout_rejects_bad_arguments(tile: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        tile_layout(100, tile, overlap)


# --------------------------------------------------------------------------- tiled_apply
def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class CountingFn:
    """Wraps fn, recording each tile's shape, so tests can assert how tiling called it."""

    def __init__(self, fn):
        self.fn = fn
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(t.shape))
        return self.fn(t)


def pointwise(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * t) * 2 + t * t


def test_pointwise_is_exact() -> None:
    x = _x(2, 3, 37, 53)
    fn = CountingFn(pointwise)
    y = tiled_apply(fn, x, tile=16, overlap=4, scale=1)
    assert torch.equal(y, pointwise(x))
    # 37 -> starts [0, 12, 21], 53 -> [0, 12, 24, 36, 37]: 15 full-size tiles, one at a time.
    assert len(fn.shapes) == 3 * 5
    assert set(fn.shapes) == {(2, 3, 16, 16)}


def test_pointwise_is_exact_in_bfloat16() -> None:
    x = _x(1, 4, 40, 24).to(torch.bfloat16)
    y = tiled_apply(pointwise, x, tile=16, overlap=6, scale=1)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, pointwise(x))


def _upsample_mix(weight: torch.Tensor):
    """Nearest x8 upsample, then a pointwise channel mix and nonlinearity: local, 4 -> 3 channels."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(t, scale_factor=8, mode="nearest")  # (B, 4, 8h, 8w)
        return torch.tanh(F.conv2d(up, weight))  # (B, 3, 8h, 8w)

    return fn


def test_upsampling_fn_equals_untiled() -> None:
    x = _x(2, 4, 20, 28)  # a small "latent"
    fn = _upsample_mix(_x(3, 4, 1, 1, seed=1))
    counted = CountingFn(fn)
    y = tiled_apply(counted, x, tile=8, overlap=2, scale=8)
    assert y.shape == (2, 3, 160, 224)
    assert torch.equal(y, fn(x))
    assert len(counted.shapes) > 1


def _conv_fn(seed: int, scale_up: bool):
    """A 3x3 zero-padded conv (receptive radius 1), optionally followed by nearest x8."""
    weight = _x(4, 4, 3, 3, seed=seed) / 6

    def fn(t: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(t, weight, padding=1)
        return F.interpolate(y, scale_factor=8, mode="nearest") if scale_up else y

    return fn


def _near_seams(size: int, starts: list[int], tile: int, radius: int, scale: float) -> torch.Tensor:
    """Output pixels within `radius` input pixels of a tile edge that is not an image edge."""
    mask = torch.zeros(int(size * scale), dtype=torch.bool)
    for s in starts:
        for edge in (s, s + tile):
            if 0 < edge < size:
                lo, hi = max(0, edge - radius), min(size, edge + radius)
                mask[int(lo * scale) : int(hi * scale)] = True
    return mask


@pytest.mark.parametrize("scale_up", [False, True], ids=["scale1", "scale8"])
def test_conv_fn_close_to_untiled(scale_up: bool) -> None:
    """A conv sees zero padding at an interior tile edge instead of the neighbour's pixels.

    So within the receptive radius (1 input px) of an interior tile edge that tile is wrong; the
    linear ramp gives it weight <= radius/overlap there (0.5/8 at scale 1; up to 7.5/64 across
    the 8-px output band at scale 8), so the blended error is that fraction of the tile's error.
    Everywhere else every contributing tile computed the same value: tiled == untiled to float
    noise. Measured (tile 16, overlap 8, input 1x4x45x61, max|ref| 3.62): max diff 0.198 at
    scale 1 and 0.365 at scale 8 on seam bands (mean 0.037); 0 elsewhere (asserted <= 1e-5).
    """
    scale = 8 if scale_up else 1
    radius = 1
    x = _x(1, 4, 45, 61)
    fn = _conv_fn(seed=2, scale_up=scale_up)
    tile, overlap = 16, 8
    y = tiled_apply(fn, x, tile=tile, overlap=overlap, scale=scale)
    ref = fn(x)
    diff = (y - ref).abs()[0].amax(dim=0)  # (H', W')
    rows = _near_seams(45, tile_layout(45, tile, overlap), tile, radius, scale)
    cols = _near_seams(61, tile_layout(61, tile, overlap), tile, radius, scale)
    seam = rows[:, None] | cols[None, :]
    assert diff[~seam].max().item() <= 1e-5
    # The wrong tile's share is <= radius/overlap; its own error is at most ~2 max|ref|.
    assert diff[seam].max().item() <= 2 * ref.abs().max().item() * radius / overlap
    assert diff.max().item() <= (0.25 if scale == 1 else 0.45)  # regression guard on the above
    assert diff[seam].mean().item() <= 0.05  # measured 0.037 at both scales


def test_downscale_avg_pool() -> None:
    """Encode-like: scale 1/8 with tiles and overlaps in multiples of 8 is exact for avg-pool 8."""
    x = _x(2, 3, 72, 104)
    fn = CountingFn(lambda t: F.avg_pool2d(t, 8))
    y = tiled_apply(fn, x, tile=32, overlap=8, scale=1 / 8)
    assert y.shape == (2, 3, 9, 13)
    assert torch.equal(y, F.avg_pool2d(x, 8))
    assert len(fn.shapes) > 1 and set(fn.shapes) == {(2, 3, 32, 32)}


def test_downscale_conv_encoder_like_close() -> None:
    """Stride-8 conv (receptive field = its 8x8 block) is exact too: tiles never cut a block."""
    x = _x(1, 3, 64, 88)
    weight = _x(8, 3, 8, 8, seed=3) / 14
    fn = lambda t: F.conv2d(t, weight, stride=8)  # noqa: E731
    y = tiled_apply(fn, x, tile=32, overlap=16, scale=0.125)
    assert (y - fn(x)).abs().max().item() <= 1e-5


def test_misaligned_downscale_is_refused() -> None:
    x = _x(1, 3, 72, 104)
    with pytest.raises(ValueError, match="whole output pixel"):
        tiled_apply(lambda t: F.avg_pool2d(t, 8), x, tile=30, overlap=6, scale=1 / 8)


def test_input_smaller_than_tile_is_one_call() -> None:
    x = _x(1, 4, 24, 32)
    fn = CountingFn(pointwise)
    y = tiled_apply(fn, x, tile=32, overlap=8, scale=1)
    assert fn.shapes == [(1, 4, 24, 32)]
    assert torch.equal(y, pointwise(x))


def test_one_axis_smaller_than_tile() -> None:
    x = _x(1, 4, 12, 70)  # H fits one tile, W needs several
    fn = CountingFn(pointwise)
    y = tiled_apply(fn, x, tile=32, overlap=8, scale=1)
    assert set(fn.shapes) == {(1, 4, 12, 32)}
    assert len(fn.shapes) == len(tile_layout(70, 32, 8))
    assert torch.equal(y, pointwise(x))


def test_blend_weights_are_linear_ramps() -> None:
    """Two tiles outputting constants 0 and 1 blend to a linear ramp across the overlap: no step."""
    x = torch.arange(24.0).reshape(1, 1, 1, 24)  # pixel value = its column

    def which_tile(t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, 1.0 if t[0, 0, 0, 0] > 0 else 0.0)  # 0 for the tile at column 0

    assert tile_layout(24, 16, 8) == [0, 8]
    y = tiled_apply(which_tile, x, tile=16, overlap=8, scale=1)[0, 0, 0]
    assert torch.allclose(y[8:16], (torch.arange(8) + 0.5) / 8)
    assert torch.all(y[:8] == 0) and torch.all(y[16:] == 1)


def test_fn_with_wrong_output_size_is_reported() -> None:
    x = _x(1, 4, 40, 40)
    with pytest.raises(ValueError, match="expected"):
        tiled_apply(lambda t: t[..., :-1], x, tile=16, overlap=4, scale=1)


@pytest.mark.parametrize(("tile", "overlap"), [(16, 16), (16, -1), (0, 0)])
def test_bad_tile_arguments(tile: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        tiled_apply(pointwise, _x(1, 1, 40, 40), tile=tile, overlap=overlap, scale=1)

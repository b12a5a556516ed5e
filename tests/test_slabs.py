"""Row-band evaluation of the VAE layers equals the plain layers, with many bands forced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimized_sd.models import ops, slabs
from optimized_sd.models.layers import group_norm


@pytest.fixture
def tiny_bands(monkeypatch):
    """A byte budget so small that every call runs several bands (8 rows, the minimum)."""
    monkeypatch.setattr(slabs, "SLAB_BYTES", 1)


@pytest.mark.parametrize("height, width", [(37, 20), (64, 48), (9, 9), (8, 16)])
@pytest.mark.parametrize("channels_in, channels_out", [(64, 32), (32, 32)])
def test_norm_silu_conv_matches(tiny_bands, height, width, channels_in, channels_out):
    torch.manual_seed(0)
    norm, conv = group_norm(channels_in, eps=1e-6), nn.Conv2d(channels_in, channels_out, 3, padding=1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, channels_in, height, width) * 3 + 1
    with torch.no_grad():
        expected = conv(F.silu(norm(x)))
        got = slabs.norm_silu_conv(x, norm, conv)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("height", [37, 64, 9, 8, 17])
def test_in_place_norm_silu_conv_matches_and_reuses_its_input(tiny_bands, height):
    """Each band's upper halo row was overwritten by the band before; the kept copy must be used."""
    torch.manual_seed(2)
    norm, conv = group_norm(32, eps=1e-6), nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, height, 11) * 2 - 1
    with torch.no_grad():
        expected = conv(F.silu(norm(x)))
        got = slabs.norm_silu_conv(x, norm, conv, in_place=True)
    assert got.data_ptr() == x.data_ptr()
    assert (got - expected).abs().max().item() <= 1e-5


def test_in_place_needs_equal_channels():
    with pytest.raises(ValueError):
        slabs.norm_silu_conv(torch.randn(1, 64, 8, 8), group_norm(64, eps=1e-6), nn.Conv2d(64, 32, 3, padding=1), in_place=True)


@pytest.mark.parametrize("projection", [nn.Identity(), nn.Conv2d(64, 32, 1)], ids=["identity", "conv1x1"])
def test_add_rows_matches(tiny_bands, projection):
    torch.manual_seed(3)
    channels_in = 32 if isinstance(projection, nn.Identity) else 64
    x, out = torch.randn(2, channels_in, 29, 6), torch.randn(2, 32, 29, 6)
    with torch.no_grad():
        expected = out + projection(x)
        got = slabs.add_rows(out.clone(), x, projection)
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("phased", [True, False], ids=["phase-convs", "upsample-then-conv"])
@pytest.mark.parametrize("banded", [True, False])
@pytest.mark.parametrize("height, width", [(19, 12), (32, 32), (4, 7), (1, 1)])
def test_nearest_up_conv_matches(tiny_bands, monkeypatch, height, width, banded, phased):
    """Both ways (the phase convs and upsample-then-conv), banded or whole, equal conv(nearest_x2(x)),
    the image edges' zero padding included."""
    monkeypatch.setattr(slabs, "PHASE_CONV_DEVICES", {"cpu"} if phased else set())
    monkeypatch.setattr(slabs, "PHASE_CONV_MIN_PIXELS", 1)  # every size here takes the path under test
    torch.manual_seed(1)
    conv = ops.default_init(slabs.NearestUpConv2d(32, banded=banded))
    x = torch.randn(2, 32, height, width)
    with torch.no_grad():
        expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)
        got = conv(x)
        got_channels_last = conv(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got_channels_last - expected).abs().max().item() <= 1e-5


def test_phase_kernels_fold_the_taps_that_share_an_input_pixel():
    """Output pixel (0, 0) of phase (0, 0) reads input rows/cols (-1, 0): taps 0 alone, then 1 + 2."""
    weight = torch.arange(9.0).reshape(1, 1, 3, 3)
    kernels = slabs.phase_kernels(weight)
    assert kernels[0][0][0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert kernels[1][1][0, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def test_bands_really_split(monkeypatch):
    monkeypatch.setattr(slabs, "SLAB_BYTES", 1)
    x = torch.randn(1, 32, 40, 8)
    assert slabs.slab_rows(x, 32) == 8  # 5 bands over 40 rows

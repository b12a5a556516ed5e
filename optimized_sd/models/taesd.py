"""TAESD: madebyollin's tiny autoencoders (`taesd`, `taesdxl`, `taef1`), ~1.2M parameters a half,
for fast decodes and live previews. Module names are the original files' `nn.Sequential` indices
(`1.weight`, `3.conv.0.weight`...), so an original state dict loads as it is.

Conventions (the original taesd.py): the decoder takes the latents the UNet works on (already times the
VAE's scale factor; for Flux also shifted), squashes them by tanh(x/3)*3 and returns an image in [0, 1];
the encoder takes an image in [0, 1] and returns such latents. `decode`/`encode` below speak the
pipelines' [-1, 1], as diffusers' AutoencoderTiny does (`x*2-1`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

DECODER_BLOCKS = (3, 3, 3, 1)  # blocks per resolution, lowest first; an upsample (x2) between levels
ENCODER_BLOCKS = (1, 3, 3, 3)  # blocks per resolution, highest first; a stride-2 conv between levels
DOWNSCALE = 2 ** (len(DECODER_BLOCKS) - 1)  # 8: one latent pixel per 8x8 image pixels


def conv(in_channels: int, out_channels: int, **options) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, **options)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3), the decoder's first layer (no weights)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus a skip (identity, or a bias-free 1x1 conv when widths differ), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv(in_channels, out_channels), nn.ReLU(), conv(out_channels, out_channels), nn.ReLU(), conv(out_channels, out_channels)
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """Latents (B, C, h, w) -> image (B, 3, 8h, 8w) in [0, 1]:
    Clamp, conv(C, w), ReLU, then per level its blocks and (but the last) Upsample and a bias-free conv, conv(w, 3)."""

    def __init__(self, latent_channels: int = 4, width: int = 64) -> None:
        layers: list[nn.Module] = [Clamp(), conv(latent_channels, width), nn.ReLU()]
        for level, blocks in enumerate(DECODER_BLOCKS):
            layers += [Block(width, width) for _ in range(blocks)]
            if level < len(DECODER_BLOCKS) - 1:
                layers += [nn.Upsample(scale_factor=2), conv(width, width, bias=False)]
        layers.append(conv(width, 3))
        super().__init__(*layers)
        self.latent_channels = latent_channels

    def decode(self, latents: Tensor) -> Tensor:
        """UNet-space latents -> pixels in [-1, 1] (the VAE's convention)."""
        return self(latents).clamp(0, 1).mul(2).sub(1)


class TinyEncoder(nn.Sequential):
    """Image (B, 3, H, W) in [0, 1] -> latents (B, C, H/8, W/8):
    conv(3, w), per level (but the first) a bias-free stride-2 conv, and its blocks, then conv(w, C)."""

    def __init__(self, latent_channels: int = 4, width: int = 64) -> None:
        layers: list[nn.Module] = []
        for level, blocks in enumerate(ENCODER_BLOCKS):
            layers.append(conv(3, width) if level == 0 else conv(width, width, stride=2, bias=False))
            layers += [Block(width, width) for _ in range(blocks)]
        layers.append(conv(width, latent_channels))
        super().__init__(*layers)
        self.latent_channels = latent_channels

    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> UNet-space latents."""
        return self(pixels.add(1).div(2))

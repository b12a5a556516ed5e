"""The SD KL autoencoder (LDM `AutoencoderKL`), named as `first_stage_model.*` checkpoint keys."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from optimized_sd.attention import attention
from optimized_sd.config import VAEConfig
from optimized_sd.models import ops
from optimized_sd.models.layers import Upsample, group_norm
from optimized_sd.models.slabs import add_rows, norm_silu_conv


class ResnetBlock(nn.Module):
    """Residual block without time conditioning; 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, eps=1e-6)
        self.conv1 = ops.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, eps=1e-6)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = ops.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else ops.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        # x and one tensor of the output's size are all that exist whole: the second conv overwrites
        # its input and the shortcut is added band by band (dropout is 0 at inference).
        h = norm_silu_conv(x, self.norm1, self.conv1)
        h = norm_silu_conv(h, self.norm2, self.conv2, in_place=True)
        return add_rows(h, x, self.nin_shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections (the VAE's mid block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.q = ops.Conv2d(channels, channels, 1)
        self.k = ops.Conv2d(channels, channels, 1)
        self.v = ops.Conv2d(channels, channels, 1)
        self.proj_out = ops.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:
            return t.flatten(2).transpose(1, 2)[:, None]  # (B, 1 head, H*W, C)

        out = attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out[:, 0].transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Asymmetric pad (right and bottom by one) then a stride-2 3x3 conv, as LDM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    """Holds block_1, attn_1, block_2 as attributes of the encoder/decoder's `mid`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): resnet blocks, then a resampler."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # SD's VAE has no attention at these resolutions; kept for key parity
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> Gaussian moments (B, 2*z, H/f, W/f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = ops.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels = config.ch
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(channels, width))
                channels = width
            last = level == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(channels), "downsample"))
        self.mid = MidBlock(channels)
        self.norm_out = group_norm(channels, eps=1e-6)
        self.conv_out = ops.Conv2d(channels, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return norm_silu_conv(self.mid(h), self.norm_out, self.conv_out)


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h*f, w*f) in about [-1, 1]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        channels = widths[-1]
        self.conv_in = ops.Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = MidBlock(channels)
        levels: list[Level] = []
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, widths[level]))
                channels = widths[level]
            levels.insert(0, Level(blocks, Upsample(channels, banded=True) if level else None, "upsample"))
        self.up = nn.ModuleList(levels)  # indexed by resolution level, run from the deepest
        self.norm_out = group_norm(channels, eps=1e-6)
        self.conv_out = ops.Conv2d(channels, config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return norm_silu_conv(h, self.norm_out, self.conv_out)


class AutoencoderKL(nn.Module):
    """Encoder and decoder with the 1x1 `quant_conv` / `post_quant_conv` between them and the latent
    (identities where the config has none, as Flux's VAE)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv: nn.Module = nn.Identity()
        self.post_quant_conv: nn.Module = nn.Identity()
        if config.use_quant_conv:
            self.quant_conv = ops.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
            self.post_quant_conv = ops.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, image: Tensor) -> Tensor:
        """Unscaled latent: the posterior mean (the first half of the moments; the log-variance is not
        needed), so encoding is deterministic and device-independent."""
        mean, _logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean

    def decode(self, latent: Tensor) -> Tensor:
        """Unscaled latent -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latent))

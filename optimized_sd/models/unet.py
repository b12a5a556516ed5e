"""The denoising UNet of SD 1.x, SD 2.x and SDXL (LDM/SGM `openaimodel.UNetModel`), with the original
module names so that `model.diffusion_model.*` checkpoint keys load with no per-layer code. The
families differ only by config: head rule, linear projections, per-level transformer depth, and
SDXL's `label_emb` over the pooled text and size conditioning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from optimized_sd.config import UNetConfig
from optimized_sd.models import ops
from optimized_sd.models.layers import SpatialTransformer, Upsample, group_norm, timestep_embedding
from optimized_sd.models.runtime import run_options


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding (Ho et al. 2020 / LDM naming)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), ops.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(), nn.Dropout(0.0), ops.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if channels == out_channels else ops.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Strided 3x3 conv; the weight is called `op` in LDM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = ops.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: the time embedding, the text context, or neither.

    The call's `RunOptions.unet_micro_batch` (`--unet_bs`, through the memory plan) runs the batch through
    the block in slices, so a streamed block is loaded once per call however the batch is cut
    (optimizedSD cuts the whole UNet)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        size = run_options().unet_micro_batch
        if size and x.shape[0] > size:
            return torch.cat(
                [self.run_layers(*parts) for parts in zip(x.split(size), emb.split(size), context.split(size))]
            )
        return self.run_layers(x, emb, context)

    def stream_parts(self) -> list[tuple[str, ...]]:
        """Layers in call order, one part each (see `SpatialTransformer.stream_parts`)."""
        return [(str(i),) for i in range(len(self))]

    def run_layers(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetEncoder(nn.Module):
    """The time (and SDXL label) embedding, input blocks and middle block that the UNet and a ControlNet
    (its trainable copy of this half, Zhang et al. 2023) share, built once here under LDM's names.
    `skip_channels` lists each input block's output width, in order."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(ops.Linear(mc, emb_dim), nn.SiLU(), ops.Linear(emb_dim, emb_dim))
        if config.adm_in_channels is not None:  # SGM's num_classes="sequential": Sequential in a Sequential
            self.label_emb = nn.Sequential(
                nn.Sequential(ops.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), ops.Linear(emb_dim, emb_dim))
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(ops.Conv2d(config.in_channels, mc, 3, padding=1))])
        self.skip_channels = [mc]
        channels = mc
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(channels, emb_dim, mult * mc)]
                channels = mult * mc
                if config.depth(level):
                    layers.append(self.transformer(channels, config.depth(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(channels)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(channels)))
                self.skip_channels.append(channels)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(channels, emb_dim, channels),
            self.transformer(channels, config.middle_depth()),
            ResBlock(channels, emb_dim, channels),
        )

    def transformer(self, channels: int, depth: int) -> SpatialTransformer:
        config = self.config
        return SpatialTransformer(
            channels, config.heads(channels), depth, config.context_dim, linear=config.use_linear_in_transformer
        )

    def embedding(self, timesteps: Tensor, y: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The time embedding (B, 4 * model_channels), plus SDXL's vector conditioning `y` through `label_emb`."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if (y is not None) != (self.config.adm_in_channels is not None):
            raise ValueError("y (vector conditioning) is given exactly when the UNet has a label_emb")
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        return emb

    def encoder_block_names(self) -> list[str]:
        """The shared children in the order `forward` runs them (the units the memory engine streams)."""
        return (
            ["time_embed"]
            + (["label_emb"] if self.config.adm_in_channels is not None else [])
            + [f"input_blocks.{i}" for i in range(len(self.input_blocks))]
            + ["middle_block"]
        )


class UNetModel(UNetEncoder):
    """UNet predicting eps or v (the pipeline's prediction adapter says which). Every top-level child
    (time_embed, label_emb, each input block, middle_block, each output block, out) is a separate
    module call, so the memory engine can stream them one by one."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)
        mc = config.model_channels
        emb_dim = mc * 4
        skip_channels = list(self.skip_channels)
        channels = skip_channels[-1]

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for index in range(config.num_res_blocks + 1):
                layers = [ResBlock(channels + skip_channels.pop(), emb_dim, mc * mult)]
                channels = mc * mult
                if config.depth(level):
                    layers.append(self.transformer(channels, config.depth(level)))
                if level and index == config.num_res_blocks:
                    layers.append(Upsample(channels))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(channels), nn.SiLU(), ops.Conv2d(mc, config.out_channels, 3, padding=1))

    def block_names(self) -> list[str]:
        """The top-level children in the order `forward` runs them (the units the memory engine streams)."""
        return self.encoder_block_names() + [f"output_blocks.{i}" for i in range(len(self.output_blocks))] + ["out"]

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor | None = None,
        down_residuals: Sequence[Tensor] | None = None,
        middle_residual: Tensor | None = None,
    ) -> Tensor:
        """x: (B, 4, h, w) latents, timesteps: (B,) float, context: (B, tokens, context_dim), y: (B, adm_in_channels)
        for SDXL -> eps or v (B, 4, h, w). A side network's residuals (ControlNet, Zhang et al. 2023), when given,
        are added to each input block's output as it becomes a skip (one per input block, in order) and to
        the middle block's output, as the ControlNet LDM code and diffusers' additional residuals do."""
        emb = self.embedding(timesteps, y, x.dtype)
        skips = []
        h = x.contiguous(memory_format=torch.channels_last) if run_options().channels_last else x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for {len(skips)} input blocks")
            skips = [skip + residual.to(skip.dtype) for skip, residual in zip(skips, down_residuals)]
        if middle_residual is not None:
            h = h + middle_residual.to(h.dtype)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # skip on the channel axis
        return self.out(h).contiguous()


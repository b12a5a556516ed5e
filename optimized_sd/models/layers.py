"""Building blocks shared by the UNet and the VAE, named as in the LDM code so checkpoint keys match."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimized_sd.attention import attention
from optimized_sd.models import ops
from optimized_sd.models.runtime import run_options
from optimized_sd.models.slabs import NearestUpConv2d


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the weights' dtype: fp16 statistics overflow (LDM does the same)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


def group_norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """SD uses 32 groups everywhere; the UNet uses eps 1e-5, transformers and the VAE 1e-6."""
    return GroupNorm32(32, channels, eps=eps)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, as LDM (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.projects_context = context_dim is not None  # keys and values from a text context (see `ContextProjections`)
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = ops.Linear(query_dim, inner, bias=False)
        self.to_k = ops.Linear(context_dim, inner, bias=False)
        self.to_v = ops.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner, query_dim), nn.Dropout(0.0))

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the context, (B, tokens, heads*dim) each."""
        return self.to_k(context), self.to_v(context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        batch = x.shape[0]

        def split_heads(t: Tensor) -> Tensor:
            return t.view(batch, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, tokens, dim)

        cache = run_options().context_projections if context is not x else None
        k, v = self.project_context(context) if cache is None else cache.get(self, context, self.project_context)
        q, k, v = split_heads(self.to_q(x)), split_heads(k), split_heads(v)
        out = attention(q, k, v)  # (B, heads, tokens, dim)
        out = out.transpose(1, 2).reshape(batch, x.shape[1], -1)  # (B, tokens, heads*dim)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020), the first half of the transformer feed-forward."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP. The call's `RunOptions.feed_forward_chunk_tokens` (from the memory plan) runs it over
    slices of the token axis so its 8x-wide hidden activation is never the peak (the output is identical)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), ops.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        chunk = run_options().feed_forward_chunk_tokens
        if not chunk or x.shape[1] <= chunk:
            return self.net(x)
        return torch.cat([self.net(part) for part in x.split(chunk, dim=1)], dim=1)  # token slices of (B, chunk, C)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map. SD 1.x projects in and out with 1x1 convs on the
    map; SD 2.x and SDXL (`linear`) with Linear layers on the tokens, as LDM's `use_linear`."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, linear: bool = False) -> None:
        super().__init__()
        dim_head = channels // heads
        inner = heads * dim_head
        self.linear = linear
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in: nn.Module = ops.Linear(channels, inner) if linear else ops.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out: nn.Module = ops.Linear(inner, channels) if linear else ops.Conv2d(inner, channels, 1)

    def stream_parts(self) -> list[tuple[str, ...]]:
        """Children in the order `forward` calls them, grouped into the parts a streamer may load one
        at a time (the norm and input projection together; each transformer layer; the output projection)."""
        return [("norm", "proj_in")] + [(f"transformer_blocks.{i}",) for i in range(len(self.transformer_blocks))] + [("proj_out",)]

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv, as one `slabs.NearestUpConv2d` (`banded`: the VAE's levels)."""

    def __init__(self, channels: int, banded: bool = False) -> None:
        super().__init__()
        self.conv = NearestUpConv2d(channels, banded=banded)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

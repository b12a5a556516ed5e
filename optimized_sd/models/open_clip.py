"""The OpenCLIP text transformer (SD 2.x's ViT-H, SDXL's ViT-bigG), with open_clip's own parameter names
(`transformer.resblocks.N.attn.in_proj_weight`, `ln_final`, `positional_embedding`, `text_projection`...)
so that `cond_stage_model.model.*` and `conditioner.embedders.N.model.*` keys load with no per-layer code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimized_sd.config import OpenCLIPConfig
from optimized_sd.models.text_encoder import causal_attention


class FusedSelfAttention(nn.Module):
    """Causal self-attention with q, k, v in one fused projection, as `nn.MultiheadAttention` stores them."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # (B, T, 3C): q then k then v
        return self.out_proj(causal_attention(q, k, v, self.heads))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer layer: `ln_1`, `attn`, `ln_2`, `mlp` (`c_fc`, exact GELU, `c_proj`)."""

    def __init__(self, width: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = FusedSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, intermediate))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(intermediate, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """`transformer.resblocks`: a plain sequence, each layer a separate module call (streamable)."""

    def __init__(self, config: OpenCLIPConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(config.width, config.heads, config.intermediate_size) for _ in range(config.layers)
        )


class OpenCLIPTextModel(nn.Module):
    """Token ids -> (context, pooled). Context: the final-norm hidden state after `layers` blocks (SD 2.x),
    or the hidden state entering the last block with no norm (`penultimate`, SDXL). Pooled (SDXL): the
    final-norm state at the end token (the highest id, as open_clip finds it by argmax) @ `text_projection`."""

    def __init__(self, config: OpenCLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = TextTransformer(config)
        self.ln_final = nn.LayerNorm(config.width)
        if config.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, T) ids -> context (B, T, width), pooled (B, projection_dim) or None."""
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]].to(self.token_embedding.weight.dtype)
        blocks = self.transformer.resblocks
        context = None
        for index, block in enumerate(blocks):
            if self.config.penultimate and index == len(blocks) - 1:
                context = x
            x = block(x)
        final = self.ln_final(x)
        if context is None:
            context = final
        pooled = None
        if self.config.projection_dim is not None:
            ends = final[torch.arange(final.shape[0], device=final.device), input_ids.argmax(dim=-1)]  # (B, width)
            pooled = ends @ self.text_projection
        return context, pooled


class FrozenOpenCLIPEmbedder(nn.Module):
    """LDM's `FrozenOpenCLIPEmbedder` / SGM's `FrozenOpenCLIPEmbedder2`: holds the tower as `model`, so keys match."""

    def __init__(self, config: OpenCLIPConfig) -> None:
        super().__init__()
        self.model = OpenCLIPTextModel(config)

    def stream_parts(self) -> list[str]:
        """Children in call order (the tower's own position embedding and projection are not among them)."""
        layers = len(self.model.transformer.resblocks)
        return ["model.token_embedding", *(f"model.transformer.resblocks.{i}" for i in range(layers)), "model.ln_final"]

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.model(input_ids)

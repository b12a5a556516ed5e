"""The Z-Image transformer (Tongyi-MAI 2025; Z-Image-Turbo), a single-stream DiT over image patches and
Qwen3 caption states, with the original checkpoint's module names (ComfyUI's `model.diffusion_model.*`,
diffusers' single-file converter reads the same): `x_embedder`, `t_embedder.mlp.0`, `cap_embedder.1`,
`noise_refiner.N`, `context_refiner.N`, `layers.N.attention.qkv`, `final_layer.linear`, ...

How it runs (diffusers' `ZImageTransformer2DModel`, basic mode): image patches and caption states are each
padded to a multiple of 32 tokens with learned pad tokens, refined apart (image layers modulated by the
timestep, caption layers not), then joined [image | caption] for the main layers. Positions are 3-axis
RoPE ids: caption token j at (1 + j, 0, 0), image patch (h, w) at (caption length + 1, h, w), image pad
tokens at (0, 0, 0). Captions of one batch may differ in length: attention then runs per group of equal
length over the valid tokens only (what diffusers' key mask computes), so the attention entry point needs
no mask.

Sizes are read off the tensors (`ZImageConfig.from_shapes`); Z-Image-Turbo is 3840 wide, 30 heads of 128,
30 main and 2+2 refiner layers, Qwen3-4B captions (2560)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimized_sd.attention import attention
from optimized_sd.models import ops
from optimized_sd.models.flux import apply_rope, rope_frequencies, split_qkv, three_rope_axes
from optimized_sd.models.layers import timestep_embedding

SEQ_MULTIPLE = 32  # image and caption tokens are each padded to a multiple of this
ROPE_THETA = 256.0
TIME_SCALE = 1000.0  # t in [0, 1] (1 = clean image) is embedded at x1000
ADALN_MAX_DIM = 256  # the timestep vector is min(dim, 256) wide
NORM_EPS = 1e-5
FINAL_NORM_EPS = 1e-6


@dataclass(frozen=True)
class ZImageConfig:
    """Z-Image transformer hyper-parameters (diffusers' defaults: Z-Image-Turbo)."""

    dim: int = 3840
    num_heads: int = 30
    num_layers: int = 30
    num_refiner_layers: int = 2
    ffn_hidden: int = 10240  # int(dim / 3 * 8)
    in_channels: int = 16
    patch_size: int = 2
    cap_feat_dim: int = 2560
    adaln_dim: int = 256  # min(dim, ADALN_MAX_DIM)
    time_hidden: int = 1024  # the timestep MLP's middle width
    time_dim: int = 256  # width of the sinusoidal embedding of t

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def axes_dim(self) -> tuple[int, int, int]:
        """RoPE widths for the (caption/frame, row, column) axes in Z-Image's proportions 1/4, 3/8, 3/8 of a
        head ((32, 48, 48) for 128); each must be even."""
        return three_rope_axes(self.head_dim, 4)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> ZImageConfig:
        """The config an original-named state dict states (keys without `model.diffusion_model.`). The patch is
        2x2 in every released model; the input width then says the latent channels."""

        def count(kind: str) -> int:
            found = {int(m.group(1)) for key in shapes if (m := re.match(rf"{kind}\.(\d+)\.", key))}
            return max(found) + 1 if found else 0

        dim, patch_in = shapes["x_embedder.weight"]
        head_dim = shapes["layers.0.attention.q_norm.weight"][0]
        patch = cls.patch_size
        return cls(
            dim=dim,
            num_heads=dim // head_dim,
            num_layers=count("layers"),
            num_refiner_layers=count("noise_refiner"),
            ffn_hidden=shapes["layers.0.feed_forward.w1.weight"][0],
            in_channels=patch_in // (patch * patch),
            patch_size=patch,
            cap_feat_dim=shapes["cap_embedder.1.weight"][1],
            adaln_dim=shapes["t_embedder.mlp.2.weight"][0],
            time_hidden=shapes["t_embedder.mlp.0.weight"][0],
            time_dim=shapes["t_embedder.mlp.0.weight"][1],
        )


class RMSNorm(nn.Module):
    """RMS norm with a learned `weight`, computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Sequence[int] | None) -> Tensor:
    """Attention of each sample over its first `lengths[i]` tokens (B, heads, L, d); rows past a sample's
    length are zeros (they are padding, dropped later). Samples of equal length share one call."""
    full = q.shape[2]
    if lengths is None or all(n == full for n in lengths):
        return attention(q, k, v)
    out = torch.zeros_like(q)
    for n in sorted(set(lengths)):
        rows = torch.tensor([i for i, length in enumerate(lengths) if length == n], device=q.device)
        out[rows, :, :n] = attention(q[rows, :, :n], k[rows, :, :n], v[rows, :, :n])
    return out


class Attention(nn.Module):
    """Self-attention with a fused bias-free qkv, QK RMS norms over the head width, and RoPE."""

    def __init__(self, config: ZImageConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.qkv = ops.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = ops.Linear(config.dim, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim)
        self.k_norm = RMSNorm(config.head_dim)

    def forward(self, x: Tensor, freqs: Tensor, lengths: Sequence[int] | None) -> Tensor:
        q, k, v = split_qkv(self.qkv(x), self.heads)  # each (B, heads, L, head_dim)
        q = apply_rope(self.q_norm(q), freqs)
        k = apply_rope(self.k_norm(k), freqs)
        return self.out(prefix_attention(q, k, v, lengths).transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """SwiGLU MLP (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = ops.Linear(dim, hidden, bias=False)
        self.w2 = ops.Linear(hidden, dim, bias=False)
        self.w3 = ops.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre- and post-normed attention and MLP; with `modulated`, the timestep vector scales the pre-norms and
    tanh-gates the residual branches (no shift)."""

    def __init__(self, config: ZImageConfig, modulated: bool) -> None:
        super().__init__()
        dim = config.dim
        self.attention = Attention(config)
        self.feed_forward = FeedForward(dim, config.ffn_hidden)
        self.attention_norm1 = RMSNorm(dim)
        self.attention_norm2 = RMSNorm(dim)
        self.ffn_norm1 = RMSNorm(dim)
        self.ffn_norm2 = RMSNorm(dim)
        self.modulated = modulated
        if modulated:
            self.adaLN_modulation = nn.Sequential(ops.Linear(config.adaln_dim, 4 * dim))

    def forward(self, x: Tensor, freqs: Tensor, lengths: Sequence[int] | None, modulation: Tensor | None = None) -> Tensor:
        """`modulation`: this block's adaLN output (B, 4*dim) for a modulated block (`ZImageModulation`)."""
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs, lengths))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        if modulation is None:
            raise ValueError("a modulated Z-Image block needs its adaLN output")
        scale_attn, gate_attn, scale_ffn, gate_ffn = modulation.to(x.dtype)[:, None].chunk(4, dim=-1)  # (B, 1, dim)
        attended = self.attention(self.attention_norm1(x) * (1 + scale_attn), freqs, lengths)
        x = x + gate_attn.tanh() * self.attention_norm2(attended)
        return x + gate_ffn.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_ffn)))


class TimestepEmbedder(nn.Module):
    def __init__(self, config: ZImageConfig) -> None:
        super().__init__()
        self.time_dim = config.time_dim
        hidden = config.time_hidden
        self.mlp = nn.Sequential(ops.Linear(config.time_dim, hidden), nn.SiLU(), ops.Linear(hidden, config.adaln_dim))

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.mlp(timestep_embedding(t * TIME_SCALE, self.time_dim).to(dtype))


class FinalLayer(nn.Module):
    """LayerNorm scaled by (1 + adaLN(t)), then the Linear back to patch channels."""

    def __init__(self, config: ZImageConfig) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(config.dim, elementwise_affine=False, eps=FINAL_NORM_EPS)
        self.linear = ops.Linear(config.dim, config.patch_size**2 * config.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(config.adaln_dim, config.dim))

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        """`scale`: the adaLN output (B, dim) of this layer's `adaLN_modulation`."""
        return self.linear(self.norm_final(x) * (1 + scale.to(x.dtype)[:, None]))


def padded_length(tokens: int) -> int:
    return tokens + (-tokens) % SEQ_MULTIPLE


def patchify(latents: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C): tokens row-major, each patch laid out (p, p, C)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // patch, patch, width // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch, (height // patch) * (width // patch), patch * patch * channels)


def unpatchify(tokens: Tensor, height: int, width: int, patch: int) -> Tensor:
    """`patchify` undone for a latent of `height` x `width`."""
    batch, _, packed = tokens.shape
    channels = packed // (patch * patch)
    patches = tokens.view(batch, height // patch, width // patch, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return patches.reshape(batch, channels, height, width)


class PadTokens(nn.Module):
    """The learned tokens that pad the image and the caption to a multiple of 32 (the checkpoint's top-level
    `x_pad_token` and `cap_pad_token`, held by a module so that the memory engine can place them as a unit)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))

    def forward(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Copies (a streamed unit's tensors are reused once it leaves), each (1, dim)."""
        return self.x_pad_token.to(dtype, copy=True), self.cap_pad_token.to(dtype, copy=True)


@dataclass(frozen=True)
class RefinedCaptions:
    """The caption branch's output for a batch, and the image pad token: it depends on the prompts only, so a
    sampling run computes it once (`ZImageTransformer.refine_captions`)."""

    states: Tensor  # (B, longest padded caption, dim); a shorter caption's tail is padding
    lengths: tuple[int, ...]  # real caption tokens per sample
    x_pad: Tensor  # (1, dim)


@dataclass(frozen=True)
class ZImageModulation:
    """Every modulated block's adaLN output for one batch of timesteps: what `forward_modulated` needs of t."""

    noise: tuple[Tensor, ...]  # per noise_refiner block (B, 4*dim)
    layers: tuple[Tensor, ...]  # per main layer (B, 4*dim)
    final: Tensor  # (B, dim): the final layer's scale

    def rows(self, start: int, end: int) -> ZImageModulation:
        return ZImageModulation(
            tuple(m[start:end] for m in self.noise), tuple(m[start:end] for m in self.layers), self.final[start:end]
        )


class ZImageTransformer(nn.Module):
    """Z-Image's denoiser. Output: x0 - noise for the input x_t (diffusers' pipeline negates it into the
    flow velocity noise - x0), at t = 1 - sigma.

    A call runs in three parts, in the order the memory engine streams them: `refine_captions` (the pad tokens,
    the caption embedder and refiners: prompts only), `modulation` (the timestep embedder and every adaLN
    linear: t only) and `forward_modulated` (the image path); a sampling run may compute the first two once."""

    def __init__(self, config: ZImageConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.x_embedder = ops.Linear(config.patch_size**2 * config.in_channels, dim)
        self.t_embedder = TimestepEmbedder(config)
        self.cap_embedder = nn.Sequential(RMSNorm(config.cap_feat_dim), ops.Linear(config.cap_feat_dim, dim))
        self.pads = PadTokens(dim)
        self.noise_refiner = nn.ModuleList(TransformerBlock(config, modulated=True) for _ in range(config.num_refiner_layers))
        self.context_refiner = nn.ModuleList(TransformerBlock(config, modulated=False) for _ in range(config.num_refiner_layers))
        self.layers = nn.ModuleList(TransformerBlock(config, modulated=True) for _ in range(config.num_layers))
        self.final_layer = FinalLayer(config)

    def block_names(self) -> list[str]:
        """The children in the order `forward` runs them."""
        refiners = [f"context_refiner.{i}" for i in range(self.config.num_refiner_layers)]
        refiners += [f"noise_refiner.{i}" for i in range(self.config.num_refiner_layers)]
        layers = [f"layers.{i}" for i in range(self.config.num_layers)]
        return ["pads", "cap_embedder", "t_embedder", "x_embedder", *refiners, *layers, "final_layer"]

    def positions(self, caption_lengths: Sequence[int], image_tokens: int, rows: int, cols: int, device) -> tuple[Tensor, Tensor]:
        """RoPE ids (B, image_tokens padded, 3) of the image and (B, longest caption padded, 3) of the captions."""
        padded_image = padded_length(image_tokens)
        longest = max(padded_length(n) for n in caption_lengths)
        caption_ids = torch.zeros(len(caption_lengths), longest, 3, device=device)
        caption_ids[..., 0] = torch.arange(1, longest + 1, device=device)
        grid = torch.zeros(rows, cols, 3, device=device)
        grid[..., 1] = torch.arange(rows, device=device)[:, None]
        grid[..., 2] = torch.arange(cols, device=device)[None, :]
        image_ids = torch.zeros(len(caption_lengths), padded_image, 3, device=device)
        for i, n in enumerate(caption_lengths):
            image_ids[i, :image_tokens] = grid.reshape(-1, 3)
            image_ids[i, :image_tokens, 0] = padded_length(n) + 1
        return image_ids, caption_ids

    def refine_captions(self, captions: Sequence[Tensor], dtype: torch.dtype) -> RefinedCaptions:
        """Captions, one (tokens_i, cap_feat_dim) tensor per sample (only the prompt's real tokens), embedded,
        padded with the pad token to a multiple of 32 and refined (no timestep)."""
        if any(c.shape[0] == 0 for c in captions):
            raise ValueError("Z-Image takes one non-empty caption per latent")
        x_pad, cap_pad = self.pads(dtype)
        device = x_pad.device
        lengths = tuple(c.shape[0] for c in captions)
        longest = max(padded_length(n) for n in lengths)
        features = torch.zeros(len(captions), longest, captions[0].shape[-1], dtype=dtype, device=device)
        for i, caption in enumerate(captions):
            features[i, : caption.shape[0]] = caption.to(device, dtype)
        cap = self.cap_embedder(features)
        beyond = torch.arange(longest, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
        cap = torch.where(beyond[..., None], cap_pad, cap)
        _, caption_ids = self.positions(lengths, 1, 1, 1, device)
        freqs = rope_frequencies(caption_ids, self.config.axes_dim, ROPE_THETA)
        padded = [padded_length(n) for n in lengths]
        for layer in self.context_refiner:
            cap = layer(cap, freqs, padded)
        return RefinedCaptions(cap, lengths, x_pad)

    def modulation(self, timesteps: Tensor, dtype: torch.dtype) -> ZImageModulation:
        """The adaLN outputs of every modulated block for timesteps (B,) in [0, 1] (1 = clean)."""
        adaln = self.t_embedder(timesteps, dtype)  # (B, adaln_dim)
        return ZImageModulation(
            tuple(layer.adaLN_modulation(adaln) for layer in self.noise_refiner),
            tuple(layer.adaLN_modulation(adaln) for layer in self.layers),
            self.final_layer.adaLN_modulation(adaln),
        )

    def forward(self, latents: Tensor, timesteps: Tensor, captions: Sequence[Tensor]) -> Tensor:
        """latents (B, C, H, W) with H, W multiples of the patch, timesteps (B,) in [0, 1] (1 = clean), captions one
        (tokens_i, cap_feat_dim) tensor per sample (only the prompt's real tokens) -> (B, C, H, W)."""
        if len(captions) != latents.shape[0]:
            raise ValueError("Z-Image takes one non-empty caption per latent")
        refined = self.refine_captions(captions, latents.dtype)
        return self.forward_modulated(latents, refined, self.modulation(timesteps, latents.dtype))

    def forward_modulated(self, latents: Tensor, captions: RefinedCaptions, modulation: ZImageModulation) -> Tensor:
        """`forward` with the caption branch and the adaLN outputs given: the image path alone."""
        dtype, device, patch = latents.dtype, latents.device, self.config.patch_size
        batch, _, height, width = latents.shape
        tokens = patchify(latents, patch)
        image_tokens = tokens.shape[1]
        image_ids, caption_ids = self.positions(captions.lengths, image_tokens, height // patch, width // patch, device)
        image_freqs = rope_frequencies(image_ids, self.config.axes_dim, ROPE_THETA)
        caption_freqs = rope_frequencies(caption_ids, self.config.axes_dim, ROPE_THETA)

        x = self.x_embedder(tokens)
        pad = captions.x_pad.to(dtype).expand(batch, padded_length(image_tokens) - image_tokens, -1)
        x = torch.cat([x, pad], dim=1)
        for layer, scales in zip(self.noise_refiner, modulation.noise, strict=True):
            x = layer(x, image_freqs, None, scales)

        joined = torch.cat([x, captions.states.to(dtype)], dim=1)  # [image | caption]; a shorter caption's tail is padding
        freqs = torch.cat([image_freqs, caption_freqs], dim=2)
        lengths = [x.shape[1] + padded_length(n) for n in captions.lengths]
        for layer, scales in zip(self.layers, modulation.layers, strict=True):
            joined = layer(joined, freqs, lengths, scales)
        out = self.final_layer(joined[:, :image_tokens], modulation.final)
        return unpatchify(out, height, width, patch)

"""The Flux.1 transformer (Black Forest Labs 2024; dev and schnell), with BFL's module names so that an
original checkpoint (`flux1-dev.safetensors`, or ComfyUI's `model.diffusion_model.*`) loads with no
per-layer code: `img_in`, `time_in`, `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...

Every size is read off the tensors (`FluxConfig.from_shapes`); nothing assumes Flux.1's 3072 width.

Modulation hoisting: the adaLN linears (`img_mod`, `txt_mod`, `modulation`, `final_layer.adaLN_modulation`)
act on one vector per sample that depends only on the timestep, the distilled guidance and the pooled
text, never on the image. They hold about a quarter of the model's weights, so `precompute_modulation`
runs them for every step of a sampling run in one batched pass, and `forward_modulated` never touches
them: a streamed model then moves only the attention and MLP weights per step.

Also here: the 2x2 packing of VAE latents into tokens and the position ids of those tokens, as
diffusers' FluxPipeline `_pack_latents` / `_unpack_latents` / `_prepare_latent_image_ids`, and the VAE
latent scale and shift."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimized_sd.attention import attention
from optimized_sd.models import ops
from optimized_sd.models.layers import timestep_embedding

VAE_SCALE = 0.3611  # Flux VAE latents: model space = (vae latent - shift) * scale
VAE_SHIFT = 0.1159
ROPE_THETA = 10000.0
TIME_FACTOR = 1000.0  # timesteps and guidance come in [0, 1]-ish units and are embedded at x1000 (BFL, diffusers)
NORM_EPS = 1e-6


def three_rope_axes(head_dim: int, first_share: int) -> tuple[int, int, int]:
    """RoPE widths of three axes: 1/`first_share` of a head for the first, the rest halved between the other two
    (Flux: 16, 56, 56 of 128; Z-Image: 32, 48, 48); each must be even (a rotation acts on pairs)."""
    first = head_dim // first_share
    second = (head_dim - first) // 2
    axes = (first, second, head_dim - first - second)
    if any(width % 2 for width in axes):
        raise ValueError(f"head width {head_dim} splits into RoPE axes {axes}, which are not all even")
    return axes


def block_count(shapes: Mapping[str, Sequence[int]], kind: str) -> int:
    """How many `kind.N.` blocks a state dict holds (the highest N + 1)."""
    found = {int(m.group(1)) for key in shapes if (m := re.match(rf"{re.escape(kind)}\.(\d+)\.", key))}
    return max(found) + 1 if found else 0


@dataclass(frozen=True)
class FluxConfig:
    """Flux transformer hyper-parameters (BFL `FluxParams`); Flux.1 dev and schnell: 3072 wide, 24 heads of 128,
    19 double and 38 single blocks, 64 packed input channels, T5-XXL context 4096, CLIP-L vector 768."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    mlp_hidden: int = 12288
    in_channels: int = 64
    out_channels: int = 64
    context_in_dim: int = 4096
    vec_in_dim: int = 768
    time_dim: int = 256  # width of the sinusoidal embedding of t and guidance
    guidance_embed: bool = True  # dev: distilled guidance input; schnell: none
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def axes_dim(self) -> tuple[int, int, int]:
        """RoPE widths for the (index, row, column) axes in Flux's proportions, 1/8, 7/16, 7/16 of a head
        (16, 56, 56 for 128); each must be even (a rotation acts on pairs)."""
        return three_rope_axes(self.head_dim, 8)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> FluxConfig:
        """The config a BFL-named state dict states (keys without any `model.diffusion_model.` prefix)."""

        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        return cls(
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=block_count(shapes, "double_blocks"),
            depth_single_blocks=block_count(shapes, "single_blocks"),
            mlp_hidden=shapes["double_blocks.0.img_mlp.0.weight"][0],
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            context_in_dim=shapes["txt_in.weight"][1],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            time_dim=shapes["time_in.in_layer.weight"][1],
            guidance_embed="guidance_in.in_layer.weight" in shapes,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        )


# --- positions ----------------------------------------------------------------------------------------


def rope_frequencies(ids: Tensor, axes_dim: Sequence[int], theta: float = ROPE_THETA) -> Tensor:
    """Rotation (cos, sin) per token and frequency for RoPE over several position axes (Su et al. 2021),
    BFL's `EmbedND`: ids (L, n_axes) or (B, L, n_axes) -> (B or 1, 1, L, head_dim/2, 2), float32,
    computed in float64 as BFL does so large positions keep their precision."""
    ids = ids if ids.dim() == 3 else ids[None]
    parts = []
    for axis, width in enumerate(axes_dim):
        exponent = torch.arange(0, width, 2, dtype=torch.float64, device=ids.device) / width
        angles = ids[..., axis].double()[..., None] / theta**exponent  # (B, L, width/2)
        parts.append(torch.stack([angles.cos(), angles.sin()], dim=-1))
    return torch.cat(parts, dim=-2).float()[:, None]  # (B, 1, L, head_dim/2, 2)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate each adjacent pair (x0, x1) of x (B, heads, L, d) by its angle: (c x0 - s x1, s x0 + c x1)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, heads, L, d/2, 2)
    cos, sin = freqs[..., 0], freqs[..., 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)


# --- layers (BFL names) ---------------------------------------------------------------------------------


class MLPEmbedder(nn.Module):
    """Linear, SiLU, Linear: the embedders of t, guidance and the pooled text vector."""

    def __init__(self, in_dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.in_layer = ops.Linear(in_dim, hidden, bias=bias)
        self.out_layer = ops.Linear(hidden, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the head width with a learned `scale`, computed in float32 (BFL's QK norm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return normed.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """Fused qkv projection, QK norm and output projection of one stream of a double block."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, proj_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = ops.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = ops.Linear(dim, dim, bias=proj_bias)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, dim) -> normed q, k and v, each (B, heads, L, head_dim)."""
        q, k, v = split_qkv(self.qkv(x), self.heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """adaLN: SiLU then one Linear from the conditioning vector to 3 (single) or 6 (double) per-channel
    vectors, in the order shift, scale, gate (x2)."""

    def __init__(self, dim: int, double: bool, bias: bool = True) -> None:
        super().__init__()
        self.lin = ops.Linear(dim, dim * (6 if double else 3), bias=bias)

    def forward(self, vec: Tensor) -> Tensor:
        """(B, dim) -> (B, 3 or 6 * dim), kept flat: `chunks` splits it where it is used."""
        return self.lin(F.silu(vec))


def chunks(modulation: Tensor, count: int) -> list[Tensor]:
    """A flat modulation (B, count*dim) as `count` tensors (B, 1, dim) that broadcast over tokens."""
    return list(modulation[:, None].chunk(count, dim=-1))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def split_qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*heads*d) laid out (K H D) -> q, k, v each (B, heads, L, d)."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def joint_attention(q: Tensor, k: Tensor, v: Tensor, freqs: Tensor) -> Tensor:
    """RoPE on q and k, attention through the project's one entry point: (B, heads, L, d) -> (B, L, heads*d)."""
    out = attention(apply_rope(q, freqs), apply_rope(k, freqs), v)
    return out.transpose(1, 2).flatten(2)


def keep_in_fp16(x: Tensor) -> Tensor:
    """Residual streams of Flux overflow fp16's range; clip them there as diffusers does (no-op otherwise)."""
    return x.clamp(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleStreamBlock(nn.Module):
    """MMDiT block (Esser et al. 2024): image and text streams with their own weights, one joint attention."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.img_mod = Modulation(dim, double=True)
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_attn = SelfAttention(dim, config.num_heads, config.qkv_bias)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_mlp = nn.Sequential(ops.Linear(dim, config.mlp_hidden), nn.GELU(approximate="tanh"), ops.Linear(config.mlp_hidden, dim))
        self.txt_mod = Modulation(dim, double=True)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_attn = SelfAttention(dim, config.num_heads, config.qkv_bias)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_mlp = nn.Sequential(ops.Linear(dim, config.mlp_hidden), nn.GELU(approximate="tanh"), ops.Linear(config.mlp_hidden, dim))

    def modulation(self, vec: Tensor) -> tuple[Tensor, Tensor]:
        """(image, text) flat modulations (B, 6*dim) for the conditioning vector."""
        return self.img_mod(vec), self.txt_mod(vec)

    def forward(self, img: Tensor, txt: Tensor, modulation: tuple[Tensor, Tensor], freqs: Tensor) -> tuple[Tensor, Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = chunks(modulation[0].to(img.dtype), 6)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = chunks(modulation[1].to(txt.dtype), 6)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))
        joint = joint_attention(  # text tokens first, as the ids are laid out
            torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, img_k], dim=2), torch.cat([txt_v, img_v], dim=2), freqs
        )
        txt_out, img_out = joint[:, : txt.shape[1]], joint[:, txt.shape[1] :]
        img = img + img_gate1 * self.img_attn.proj(img_out)
        img = img + img_gate2 * self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))
        return keep_in_fp16(img), keep_in_fp16(txt)


class SingleStreamBlock(nn.Module):
    """DiT block over the joined text+image tokens with attention and MLP in parallel (Dehghani et al. 2023):
    `linear1` makes q, k, v and the MLP hidden at once, `linear2` takes [attention | GELU(mlp)]."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.heads = config.num_heads
        self.mlp_hidden = config.mlp_hidden
        self.linear1 = ops.Linear(dim, dim * 3 + config.mlp_hidden)
        self.linear2 = ops.Linear(dim + config.mlp_hidden, dim)
        self.norm = QKNorm(config.head_dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, modulation: Tensor, freqs: Tensor) -> Tensor:
        shift, scale, gate = chunks(modulation.to(x.dtype), 3)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([x.shape[-1] * 3, self.mlp_hidden], dim=-1)
        q, k, v = split_qkv(qkv, self.heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([joint_attention(q, k, v, freqs), self.mlp_act(mlp)], dim=2))
        return keep_in_fp16(x + gate * out)


class LastLayer(nn.Module):
    """adaLN (shift, scale; no gate) then the Linear back to packed latent channels."""

    def __init__(self, config: FluxConfig, bias: bool = True) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.linear = ops.Linear(dim, config.out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(dim, dim * 2, bias=bias))

    def forward(self, x: Tensor, modulation: Tensor) -> Tensor:
        shift, scale = chunks(modulation.to(x.dtype), 2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass(frozen=True)
class FluxModulation:
    """Every block's adaLN output for one batch of conditioning vectors (flat, (B, k*dim) each): what
    `forward_modulated` needs instead of t, guidance and the pooled text."""

    double: tuple[tuple[Tensor, Tensor], ...]  # per double block: (image, text), each (B, 6*dim)
    single: tuple[Tensor, ...]  # per single block: (B, 3*dim)
    final: Tensor  # (B, 2*dim): shift, scale of the last layer

    def rows(self, start: int, stop: int) -> FluxModulation:
        """The modulation of samples start..stop of the batch."""
        return FluxModulation(
            tuple((img[start:stop], txt[start:stop]) for img, txt in self.double),
            tuple(single[start:stop] for single in self.single),
            self.final[start:stop],
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FluxModulation:
        return FluxModulation(
            tuple((img.to(device, dtype), txt.to(device, dtype)) for img, txt in self.double),
            tuple(single.to(device, dtype) for single in self.single),
            self.final.to(device, dtype),
        )


class Flux(nn.Module):
    """The Flux.1 transformer over packed latent tokens; predicts the flow velocity (noise - x0)."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.img_in = ops.Linear(config.in_channels, dim)
        self.time_in = MLPEmbedder(config.time_dim, dim)
        self.vector_in = MLPEmbedder(config.vec_in_dim, dim)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(config.time_dim, dim)
        self.txt_in = ops.Linear(config.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(config)

    def block_names(self) -> list[str]:
        """The top-level children in the order `forward` runs them (the units a memory engine streams)."""
        embedders = ["time_in", "vector_in"] + (["guidance_in"] if self.config.guidance_embed else [])
        return (
            embedders
            + ["img_in", "txt_in"]
            + [f"double_blocks.{i}" for i in range(self.config.depth)]
            + [f"single_blocks.{i}" for i in range(self.config.depth_single_blocks)]
            + ["final_layer"]
        )

    def modulation_modules(self) -> list[str]:
        """Names of the adaLN linears `precompute_modulation` runs and `forward_modulated` never does."""
        return (
            [f"double_blocks.{i}.{stream}_mod" for i in range(self.config.depth) for stream in ("img", "txt")]
            + [f"single_blocks.{i}.modulation" for i in range(self.config.depth_single_blocks)]
            + ["final_layer.adaLN_modulation"]
        )

    def conditioning_vector(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """`vec` (B, dim) from timesteps in [0, 1] (B,), the pooled CLIP vector y (B, vec_in_dim) and, for dev,
        the distilled guidance scale (B,); t and guidance are embedded at x1000, as BFL and diffusers do. Computed
        in y's dtype (the op layer casts stored weights to it)."""
        dtype = y.dtype
        vec = self.time_in(timestep_embedding(timesteps * TIME_FACTOR, self.config.time_dim).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux model (dev) takes a distilled guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance * TIME_FACTOR, self.config.time_dim).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def modulation(self, vec: Tensor) -> FluxModulation:
        """Every block's adaLN output for the conditioning vectors `vec` (B, dim)."""
        return FluxModulation(
            tuple(block.modulation(vec) for block in self.double_blocks),
            tuple(block.modulation(vec) for block in self.single_blocks),
            self.final_layer.adaLN_modulation(vec),
        )

    def precompute_modulation(self, conditions: Sequence[tuple[Tensor, Tensor | None, Tensor]]) -> list[FluxModulation]:
        """The modulation for each (timesteps (B,), guidance (B,) or None, pooled (B, vec_in_dim)) of a sampling
        run, computed in one batched pass over all of them, so each adaLN weight is read once per run."""
        timesteps = torch.cat([t for t, _, _ in conditions])
        guidance = None if conditions[0][1] is None else torch.cat([g for _, g, _ in conditions])  # type: ignore[misc]
        pooled = torch.cat([y for _, _, y in conditions])
        together = self.modulation(self.conditioning_vector(timesteps, pooled, guidance))
        out, start = [], 0
        for t, _, _ in conditions:
            out.append(together.rows(start, start + t.shape[0]))
            start += t.shape[0]
        return out

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """BFL's signature: img (B, L_img, in_channels) packed latents, img_ids (L_img, 3) or (B, L_img, 3), txt (B,
        L_txt, context_in_dim) T5 states, txt_ids likewise (zeros), timesteps (B,) in [0, 1], y (B, vec_in_dim)
        pooled CLIP, guidance (B,) for dev -> velocity (B, L_img, out_channels)."""
        return self.forward_modulated(img, img_ids, txt, txt_ids, self.modulation(self.conditioning_vector(timesteps, y, guidance)))

    def forward_modulated(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, modulation: FluxModulation) -> Tensor:
        """`forward` with the adaLN outputs given (`precompute_modulation`): no modulation weight is used."""
        ids = torch.cat([txt_ids, img_ids], dim=-2)  # text tokens first
        freqs = rope_frequencies(ids, self.config.axes_dim)
        img = self.img_in(img)
        txt = self.txt_in(txt)
        for block, block_modulation in zip(self.double_blocks, modulation.double, strict=True):
            img, txt = block(img, txt, block_modulation, freqs)
        x = torch.cat([txt, img], dim=1)
        for block, block_modulation in zip(self.single_blocks, modulation.single, strict=True):
            x = block(x, block_modulation, freqs)
        return self.final_layer(x[:, txt.shape[1] :], modulation.final)


# --- latents <-> tokens -----------------------------------------------------------------------------------


def pack_latents(latents: Tensor) -> Tensor:
    """VAE latents (B, C, H, W), H and W even -> tokens (B, H/2 * W/2, C*4), each a 2x2 patch laid out
    (C, 2, 2) (diffusers' `_pack_latents`)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """`pack_latents` undone: tokens (B, H/2 * W/2, C*4) -> latents (B, C, H, W) for latent height and width."""
    batch, _, packed = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed // 4, height, width)


def image_ids(height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids (H/2 * W/2, 3) of the packed tokens of a (H, W) latent: (0, row, column), in token order
    (diffusers' `_prepare_latent_image_ids` for the halved sizes)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def text_ids(tokens: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids (tokens, 3) of the text tokens: all zero in Flux.1."""
    return torch.zeros(tokens, 3, device=device, dtype=dtype)


def latents_from_vae(latents: Tensor) -> Tensor:
    """A Flux VAE's raw latents in the transformer's space."""
    return (latents - VAE_SHIFT) * VAE_SCALE


def latents_to_vae(latents: Tensor) -> Tensor:
    """The transformer's latents as the Flux VAE decodes them (z / scale + shift)."""
    return latents / VAE_SCALE + VAE_SHIFT

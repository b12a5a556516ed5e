"""The Flux.2 transformer (Black Forest Labs 2025; klein 4B and 9B) with BFL's module names, so that an original
checkpoint (`flux-2-klein-4b.safetensors`, or ComfyUI's `model.diffusion_model.*`) loads with no per-layer code:
`img_in`, `time_in`, `double_stream_modulation_img.lin`, `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`,
`final_layer.adaLN_modulation.1`, ... (the names diffusers' `convert_flux2_transformer_checkpoint_to_diffusers` reads).

What changed from Flux.1 (`models/flux.py`, whose layers this file reuses): every Linear is bias-free; the MLPs are
SwiGLU (one Linear makes gate and value); there is no pooled text vector; positions are 4-axis RoPE ids (t, h, w, l)
at theta 2000; and the adaLN modulation is shared: one `double_stream_modulation_img/_txt` for all double blocks and
one `single_stream_modulation` for all single blocks. Klein has no guidance embedder (dev, 6144 wide, has one).

Modulation hoisting: the four adaLN linears act on a vector that depends only on the timestep (and dev's guidance),
so `precompute_modulation` runs them for every step of a run in one batched pass and `forward_modulated` never
touches them.

Also here: the latent layout of Flux2KleinPipeline (32-channel VAE latents patchified 2x2 to 128 channels, normalised
by the VAE's batch-norm running statistics, one token per 16x16 pixels), the 4-axis ids, and `Flux2Autoencoder`, the
LDM KL autoencoder (`models/vae.py`) with those statistics as its `bn` buffers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimized_sd.config import VAEConfig
from optimized_sd.models import flux, ops
from optimized_sd.models.flux import LastLayer, MLPEmbedder, Modulation, QKNorm, SelfAttention, block_count, rope_frequencies
from optimized_sd.models.layers import timestep_embedding
from optimized_sd.models.vae import AutoencoderKL

ROPE_THETA = 2000.0
ROPE_AXES = 4  # (t: image index, h: row, w: column, l: text position)
TIME_FACTOR = 1000.0  # t and guidance in [0, 1]-ish units, embedded at x1000 (BFL, diffusers)
NORM_EPS = 1e-6
PATCH = 2  # VAE latents are patchified 2x2 into channels before the transformer sees them
VAE_DOWNSCALE = 8
PIXELS_PER_TOKEN = VAE_DOWNSCALE * PATCH  # 16
BATCH_NORM_EPS = 1e-4  # the VAE's `bn` (BFL's `bn_eps`, diffusers' `batch_norm_eps`)
REFERENCE_TIME_STEP = 10  # reference image i of an edit sits at t = 10 + 10 i (the pipeline's `_prepare_image_ids`)


@dataclass(frozen=True)
class Flux2Config:
    """Flux.2 transformer hyper-parameters (BFL `Flux2Params`); defaults: klein 4B (3072 wide, 24 heads of 128,
    5 double and 20 single blocks, SwiGLU hidden 9216, 128 packed channels, Qwen3-4B context 3 x 2560)."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5
    depth_single_blocks: int = 20
    mlp_hidden: int = 9216  # SwiGLU inner width (mlp_ratio 3); the input Linear makes twice this
    in_channels: int = 128
    out_channels: int = 128
    context_in_dim: int = 7680
    time_dim: int = 256
    guidance_embed: bool = False  # klein: none; dev: distilled guidance input

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def axes_dim(self) -> tuple[int, ...]:
        """RoPE widths of the four axes: a quarter of a head each ((32, 32, 32, 32) for 128); each must be even."""
        width = self.head_dim // ROPE_AXES
        if width % 2 or width * ROPE_AXES != self.head_dim:
            raise ValueError(f"head width {self.head_dim} does not split into {ROPE_AXES} even RoPE axes")
        return (width,) * ROPE_AXES

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> Flux2Config:
        """The config a BFL-named state dict states (keys without any `model.diffusion_model.` prefix)."""

        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        return cls(
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=block_count(shapes, "double_blocks"),
            depth_single_blocks=block_count(shapes, "single_blocks"),
            mlp_hidden=shapes["double_blocks.0.img_mlp.2.weight"][1],
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            context_in_dim=shapes["txt_in.weight"][1],
            time_dim=shapes["time_in.in_layer.weight"][1],
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )


class SwiGLU(nn.Module):
    """silu(first half) * second half (Shazeer 2020): gate and value come out of one Linear."""

    def forward(self, x: Tensor) -> Tensor:
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate) * value


def swiglu_mlp(dim: int, hidden: int) -> nn.Sequential:
    """`*_mlp.0` (dim -> 2*hidden), SwiGLU, `*_mlp.2` (hidden -> dim), bias-free."""
    return nn.Sequential(ops.Linear(dim, 2 * hidden, bias=False), SwiGLU(), ops.Linear(hidden, dim, bias=False))


class DoubleStreamBlock(flux.DoubleStreamBlock):
    """Flux.1's MMDiT block without its own modulation linears (Flux.2 shares them across blocks), with bias-free
    attention and SwiGLU MLPs; `forward` is Flux.1's, given the shared (image, text) modulation."""

    def __init__(self, config: Flux2Config) -> None:
        nn.Module.__init__(self)  # the parent's layers are not these: build Flux.2's under the same names
        dim = config.hidden_size
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS))
            self.add_module(f"{stream}_attn", SelfAttention(dim, config.num_heads, qkv_bias=False, proj_bias=False))
            self.add_module(f"{stream}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS))
            self.add_module(f"{stream}_mlp", swiglu_mlp(dim, config.mlp_hidden))


class SingleStreamBlock(flux.SingleStreamBlock):
    """Flux.1's parallel block with a bias-free `linear1` that makes q, k, v and a SwiGLU's gate and value, and no
    modulation of its own; `forward` is Flux.1's, given the shared modulation."""

    def __init__(self, config: Flux2Config) -> None:
        nn.Module.__init__(self)
        dim = config.hidden_size
        self.heads = config.num_heads
        self.mlp_hidden = 2 * config.mlp_hidden  # the MLP part of linear1's output
        self.linear1 = ops.Linear(dim, dim * 3 + self.mlp_hidden, bias=False)
        self.linear2 = ops.Linear(dim + config.mlp_hidden, dim, bias=False)
        self.norm = QKNorm(config.head_dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.mlp_act = SwiGLU()


@dataclass(frozen=True)
class Flux2Modulation:
    """The shared adaLN outputs for one batch of conditioning vectors (flat, (B, k*dim) each): what
    `forward_modulated` needs instead of t and guidance."""

    double_img: Tensor  # (B, 6*dim): shift, scale, gate of attention then MLP, every double block's image stream
    double_txt: Tensor  # (B, 6*dim): the same for the text stream
    single: Tensor  # (B, 3*dim): shift, scale, gate of every single block
    final: Tensor  # (B, 2*dim): shift, scale of the last layer

    def rows(self, start: int, stop: int) -> Flux2Modulation:
        """The modulation of samples start..stop of the batch."""
        return Flux2Modulation(*(t[start:stop] for t in self.tensors()))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Flux2Modulation:
        return Flux2Modulation(*(t.to(device, dtype) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.double_img, self.double_txt, self.single, self.final


def joined_ids(txt_ids: Tensor, img_ids: Tensor) -> Tensor:
    """Text then image position ids, (L, 4) or (B, L, 4) each, as one (L_txt + L_img, 4) or (B, ..., 4) tensor."""
    if txt_ids.dim() == img_ids.dim():
        return torch.cat([txt_ids, img_ids], dim=-2)
    batch = max(txt_ids.shape[0] if txt_ids.dim() == 3 else 1, img_ids.shape[0] if img_ids.dim() == 3 else 1)
    as_batch = [ids if ids.dim() == 3 else ids[None].expand(batch, -1, -1) for ids in (txt_ids, img_ids)]
    return torch.cat(as_batch, dim=-2)


class Flux2(nn.Module):
    """The Flux.2 transformer over packed latent tokens; predicts the flow velocity (noise - x0)."""

    def __init__(self, config: Flux2Config) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.img_in = ops.Linear(config.in_channels, dim, bias=False)
        self.time_in = MLPEmbedder(config.time_dim, dim, bias=False)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(config.time_dim, dim, bias=False)
        self.txt_in = ops.Linear(config.context_in_dim, dim, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.double_stream_modulation_img = Modulation(dim, double=True, bias=False)
        self.double_stream_modulation_txt = Modulation(dim, double=True, bias=False)
        self.single_stream_modulation = Modulation(dim, double=False, bias=False)
        self.final_layer = LastLayer(config, bias=False)  # type: ignore[arg-type]  # reads hidden_size, out_channels

    def block_names(self) -> list[str]:
        """The top-level children in the order `forward` runs them (the units a memory engine streams)."""
        embedders = ["time_in"] + (["guidance_in"] if self.config.guidance_embed else [])
        modulations = ["double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"]
        return (
            embedders
            + modulations
            + ["img_in", "txt_in"]
            + [f"double_blocks.{i}" for i in range(self.config.depth)]
            + [f"single_blocks.{i}" for i in range(self.config.depth_single_blocks)]
            + ["final_layer"]
        )

    def modulation_modules(self) -> list[str]:
        """Names of the adaLN linears `precompute_modulation` runs and `forward_modulated` never does."""
        return ["double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation", "final_layer.adaLN_modulation"]

    def conditioning_vector(self, timesteps: Tensor, guidance: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """`vec` (B, dim) from timesteps in [0, 1] (B,) (= sigma) and, for dev, the distilled guidance (B,); klein
        ignores guidance, as diffusers does. Computed in `dtype` (the op layer casts stored weights to it)."""
        vec = self.time_in(timestep_embedding(timesteps * TIME_FACTOR, self.config.time_dim).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux.2 model (dev) takes a distilled guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance * TIME_FACTOR, self.config.time_dim).to(dtype))
        return vec

    def modulation(self, vec: Tensor) -> Flux2Modulation:
        """The shared adaLN outputs for the conditioning vectors `vec` (B, dim)."""
        return Flux2Modulation(
            self.double_stream_modulation_img(vec),
            self.double_stream_modulation_txt(vec),
            self.single_stream_modulation(vec),
            self.final_layer.adaLN_modulation(vec),
        )

    def precompute_modulation(
        self, conditions: Sequence[tuple[Tensor, Tensor | None]], dtype: torch.dtype = torch.float32
    ) -> list[Flux2Modulation]:
        """The modulation for each (timesteps (B,), guidance (B,) or None) of a sampling run, in one batched pass,
        so each adaLN weight is read once per run."""
        timesteps = torch.cat([t for t, _ in conditions])
        guidance = None if conditions[0][1] is None else torch.cat([g for _, g in conditions])  # type: ignore[misc]
        together = self.modulation(self.conditioning_vector(timesteps, guidance, dtype))
        out, start = [], 0
        for t, _ in conditions:
            out.append(together.rows(start, start + t.shape[0]))
            start += t.shape[0]
        return out

    def forward(
        self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, guidance: Tensor | None = None
    ) -> Tensor:
        """img (B, L_img, in_channels) packed latents (an edit's reference tokens appended after the noisy ones),
        img_ids (L_img, 4) or (B, L_img, 4), txt (B, L_txt, context_in_dim) Qwen3 states, txt_ids (L_txt, 4) or
        (B, L_txt, 4), timesteps (B,) = sigma in [0, 1], guidance (B,) for dev -> velocity (B, L_img, out_channels)."""
        modulation = self.modulation(self.conditioning_vector(timesteps, guidance, img.dtype))
        return self.forward_modulated(img, img_ids, txt, txt_ids, modulation)

    def forward_modulated(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, modulation: Flux2Modulation) -> Tensor:
        """`forward` with the adaLN outputs given (`precompute_modulation`): no modulation weight is used."""
        freqs = rope_frequencies(joined_ids(txt_ids, img_ids), self.config.axes_dim, ROPE_THETA)  # text tokens first
        img = self.img_in(img)
        txt = self.txt_in(txt)
        double = (modulation.double_img, modulation.double_txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, double, freqs)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, modulation.single, freqs)
        return self.final_layer(x[:, txt.shape[1] :], modulation.final)


# --- latents <-> tokens (Flux2KleinPipeline's layout) ------------------------------------------------------


def patchify(latents: Tensor) -> Tensor:
    """VAE latents (B, C, H, W), H and W even -> (B, 4C, H/2, W/2), channel c*4 + 2*dy + dx (the pipeline's
    `_patchify_latents`; BFL's `c (i pi) (j pj) -> (c pi pj) i j`)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(batch, channels * PATCH * PATCH, height // PATCH, width // PATCH)


def unpatchify(latents: Tensor) -> Tensor:
    """`patchify` undone: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels // (PATCH * PATCH), PATCH, PATCH, height, width).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(batch, channels // (PATCH * PATCH), height * PATCH, width * PATCH)


def pack(latents: Tensor) -> Tensor:
    """Patchified latents (B, C, h, w) -> tokens (B, h*w, C), row-major (the pipeline's `_pack_latents`)."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, rows: int, cols: int) -> Tensor:
    """`pack` undone: tokens (B, rows*cols, C) -> (B, C, rows, cols)."""
    return tokens.transpose(1, 2).unflatten(2, (rows, cols))


def token_grid(height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of tokens for an image of height x width pixels: one per 16x16, rounded down (the pipeline's
    `prepare_latents`)."""
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def noise_shape(batch: int, height: int, width: int, channels: int = 128) -> tuple[int, int, int, int]:
    """The shape the initial noise is drawn in, already patchified: (B, 128, H/16, W/16); drawing it in this shape
    with the same generator reproduces diffusers' Flux2KleinPipeline latents."""
    return (batch, channels, *token_grid(height, width))


def image_ids(rows: int, cols: int, time: int = 0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids (rows*cols, 4) of an image's tokens in token order: (time, row, column, 0). The generated image
    has time 0; an edit's reference image i has time 10 + 10 i (`REFERENCE_TIME_STEP`)."""
    ids = torch.zeros(rows, cols, ROPE_AXES, device=device, dtype=dtype)
    ids[..., 0] = time
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, ROPE_AXES)


def text_ids(tokens: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids (tokens, 4) of the text tokens: (0, 0, 0, position)."""
    ids = torch.zeros(tokens, ROPE_AXES, device=device, dtype=dtype)
    ids[:, 3] = torch.arange(tokens, device=device, dtype=dtype)
    return ids


def normalize_latents(latents: Tensor, mean: Tensor, var: Tensor, eps: float = BATCH_NORM_EPS) -> Tensor:
    """Patchified VAE latents (B, 128, h, w) in the transformer's space: (z - running mean) / sqrt(running var + eps)."""
    mean, var = (t.view(1, -1, 1, 1).to(latents.device, latents.dtype) for t in (mean, var))
    return (latents - mean) / torch.sqrt(var + eps)


def denormalize_latents(latents: Tensor, mean: Tensor, var: Tensor, eps: float = BATCH_NORM_EPS) -> Tensor:
    """`normalize_latents` undone: the transformer's latents as the VAE's patchified latents."""
    mean, var = (t.view(1, -1, 1, 1).to(latents.device, latents.dtype) for t in (mean, var))
    return latents * torch.sqrt(var + eps) + mean


class LatentStatistics(nn.Module):
    """The VAE's `bn`: running mean and variance of the patchified latents (an affine-free BatchNorm2d used only in
    eval mode). `num_batches_tracked` in files is a training counter, not read. Called (not read) by the VAE, so a
    memory engine's hooks place its buffers before they are used."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, latents: Tensor, undo: bool = False) -> Tensor:
        """`normalize_latents`, or (`undo`) `denormalize_latents`."""
        return (denormalize_latents if undo else normalize_latents)(latents, self.running_mean, self.running_var)


class Flux2Autoencoder(AutoencoderKL):
    """Flux.2's VAE: the LDM KL autoencoder (32 latent channels, 1x1 quant convs) plus the latent statistics `bn`.
    Its config's `patch` is 2, and `encode`/`decode` speak the transformer's normalised, patchified latents
    (B, 128, H/16, W/16), so the shared VAE stages run it as any VAE; `raw_encode`/`raw_decode` are the
    autoencoder's own (B, 32, H/8, W/8)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        self.bn = LatentStatistics(config.z_channels * PATCH * PATCH)

    raw_encode = AutoencoderKL.encode
    raw_decode = AutoencoderKL.decode

    def encode(self, image: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> the transformer's latents (the posterior mean, as the pipeline's argmax)."""
        return self.bn(patchify(self.raw_encode(image)))

    def decode(self, latent: Tensor) -> Tensor:
        """The transformer's latents (B, 128, h, w) -> image (B, 3, 16h, 16w) in about [-1, 1]."""
        return self.raw_decode(unpatchify(self.bn(latent, True)))

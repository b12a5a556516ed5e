"""The ControlNet of Zhang et al. 2023 (lllyasviel's `cldm.ControlNet`) with the original module names, so a
`control_model.*` file loads with no per-layer code: a trainable copy of the UNet's encoder half
(`UNetEncoder`: time_embed, label_emb for SDXL, input_blocks, middle_block), a small hint encoder
(`input_hint_block`) whose output is added after the first input block, and one zero-initialised 1x1 conv per
input block (`zero_convs.N.0`) plus one after the middle block (`middle_block_out.0`). Its outputs are the
residuals the UNet adds to its skips and to its middle block (`sampling.ControlResiduals`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from optimized_sd.config import UNetConfig
from optimized_sd.models import ops
from optimized_sd.models.unet import UNetEncoder
from optimized_sd.side_inputs import ControlResiduals

HINT_WIDTHS = (16, 32, 96, 256)  # the hint encoder's widths in every released ControlNet (diffusers' default)
SOFT_INJECTION_BASE = 0.825  # AUTOMATIC1111's "My prompt is more important": output i weighted 0.825 ** (12 - i)
CONTROL_MODES = ("balanced", "prompt", "controlnet")  # AUTOMATIC1111's three "Control Mode" choices


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the encoder half of `unet` (its input blocks, middle block and embeddings), a hint encoder
    taking `hint_channels` image channels through `hint_widths` (each width one stride-1 conv, then a
    stride-2 conv into the next), and what diffusers' config may add: `global_pool` (the residuals averaged
    over the image, as the shuffle model) and `bgr` (the hint's channels reversed before encoding)."""

    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = HINT_WIDTHS
    global_pool: bool = False
    bgr: bool = False


def hint_encoder(hint_channels: int, widths: tuple[int, ...], out_channels: int) -> nn.Sequential:
    """conv 3->16, SiLU, conv 16->16, SiLU, conv 16->32 stride 2, SiLU, ... conv 256->model_channels (zero
    initialised in training): LDM's `input_hint_block`, the image brought down 8x to the latents' size."""
    convs: list[nn.Module] = [ops.Conv2d(hint_channels, widths[0], 3, padding=1)]
    for width, wider in zip(widths, widths[1:]):
        convs += [ops.Conv2d(width, width, 3, padding=1), ops.Conv2d(width, wider, 3, padding=1, stride=2)]
    convs.append(ops.Conv2d(widths[-1], out_channels, 3, padding=1))
    layers: list[nn.Module] = []
    for conv in convs[:-1]:
        layers += [conv, nn.SiLU()]
    return nn.Sequential(*layers, convs[-1])


def hint_conv_indices(widths: tuple[int, ...]) -> list[int]:
    """Positions of the convs in `hint_encoder`'s Sequential (every other layer: a SiLU follows each but the last)."""
    return [2 * i for i in range(2 * len(widths))]


def one_by_one(channels: int) -> nn.Sequential:
    return nn.Sequential(ops.Conv2d(channels, channels, 1))


def control_scales(count: int, mode: str, weight: float) -> list[float]:
    """The weight of each of `count` residuals (input blocks in order, then the middle block) for a control mode:
    "balanced" `weight` everywhere (diffusers' default); "prompt" AUTOMATIC1111's soft injection, output i
    weighted by weight * 0.825 ** (12 - i) (its list of 13, cut to the first `count` for SDXL as it does);
    "controlnet" diffusers' guess mode, weight * logspace(-1, 0, count): 0.1 for the first skip to 1 for the
    middle block (the caller also runs the ControlNet on the conditional half only)."""
    if mode == "balanced":
        return [weight] * count
    if mode == "prompt":
        return [weight * SOFT_INJECTION_BASE ** float(12 - i) for i in range(count)]
    if mode == "controlnet":
        return [weight * float(s) for s in torch.logspace(-1, 0, count, dtype=torch.float32)]
    raise ValueError(f"unknown control mode {mode!r}; expected one of {', '.join(CONTROL_MODES)}")


class ControlNetModel(UNetEncoder):
    """A ControlNet (module names as in `control_model.*`). `encode_hint` runs once per image; `forward` once
    per model call, on the hint's encoding."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__(config.unet)
        self.control_config = config
        self.input_hint_block = hint_encoder(config.hint_channels, config.hint_widths, config.unet.model_channels)
        self.zero_convs = nn.ModuleList(one_by_one(channels) for channels in self.skip_channels)
        self.middle_block_out = one_by_one(self.skip_channels[-1])

    def block_names(self) -> list[str]:
        """The top-level children in the order they run (the units the memory engine may stream)."""
        return ["input_hint_block", *self.encoder_block_names(), "zero_convs", "middle_block_out"]

    def encode_hint(self, image: Tensor) -> Tensor:
        """(B, hint_channels, H, W) control image in [0, 1] -> (B, model_channels, H/8, W/8): the hint's encoding,
        the same at every step, so the sampler computes it once."""
        if self.control_config.bgr:
            image = image.flip(1)
        return self.input_hint_block(image)

    def forward(
        self,
        x: Tensor,
        hint: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor | None = None,
        scales: list[float] | float = 1.0,
    ) -> ControlResiduals:
        """x: (B, 4, h, w) latents as the UNet sees them, hint: `encode_hint`'s (B or 1, model_channels, h, w),
        timesteps (B,), context (B, tokens, context_dim), y (B, adm_in_channels) for SDXL -> the residuals,
        each multiplied by its scale (one float for all, or one per residual: `control_scales`)."""
        emb = self.embedding(timesteps, y, x.dtype)
        outputs = []
        h = x
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + hint.to(h.dtype)  # the hint enters after the first conv, as in LDM's ControlNet
            outputs.append(zero_conv(h))
        outputs.append(self.middle_block_out(self.middle_block(h, emb, context)))
        per_output = [scales] * len(outputs) if isinstance(scales, (int, float)) else scales
        if len(per_output) != len(outputs):
            raise ValueError(f"{len(per_output)} control scales for {len(outputs)} ControlNet outputs")
        outputs = [out * scale for out, scale in zip(outputs, per_output)]
        if self.control_config.global_pool:
            outputs = [out.mean(dim=(2, 3), keepdim=True) for out in outputs]
        return ControlResiduals(tuple(outputs[:-1]), outputs[-1])

    @property
    def residual_count(self) -> int:
        """How many residuals `forward` returns (one per input block, plus the middle block's)."""
        return len(self.zero_convs) + 1


def zero_residuals_like(residuals: ControlResiduals) -> ControlResiduals:
    """Residuals of zeros shaped like `residuals` (the unconditional half in guess mode)."""
    return ControlResiduals(tuple(torch.zeros_like(r) for r in residuals.down), torch.zeros_like(residuals.middle))

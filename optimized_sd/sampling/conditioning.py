"""What the UNet is conditioned on, as one object that travels from the text tower to the model call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """Cross-attention `context` (B, tokens, C) plus, for UNets with a `label_emb`, the vector `y`
    (B, adm_in_channels): SDXL's pooled text and size/crop embeddings. SD 1.x leaves `y` None."""

    context: Tensor
    y: Tensor | None = None

    def __post_init__(self) -> None:
        if self.y is not None and self.y.shape[0] != self.context.shape[0]:
            raise ValueError(f"context and y disagree on the batch: {self.context.shape[0]} vs {self.y.shape[0]}")

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def cat(self, other: Conditioning) -> Conditioning:
        """`self` then `other` along the batch (CFG runs uncond and cond in one UNet call)."""
        if (self.y is None) != (other.y is None):
            raise ValueError("cannot batch a conditioning with a vector y and one without")
        y = None if self.y is None or other.y is None else torch.cat([self.y, other.y])
        return Conditioning(torch.cat([self.context, other.context]), y)

    def repeat(self, n: int) -> Conditioning:
        """A batch of n from a batch of one (expanded views: no copy)."""
        if self.batch != 1:
            raise ValueError(f"repeat expects a batch of one, got {self.batch}")
        y = None if self.y is None else self.y.expand(n, *self.y.shape[1:])
        return Conditioning(self.context.expand(n, *self.context.shape[1:]), y)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        y = None if self.y is None else self.y.to(device, dtype)
        return Conditioning(self.context.to(device, dtype), y)

"""What the UNet is conditioned on, as one object that travels from the text tower to the model call."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from optimized_sd.side_inputs import ControlResiduals


def _cat(a: Any, b: Any, what: str) -> Any:
    """Two optional batch-first extras along the batch: both or neither."""
    if (a is None) != (b is None):
        raise ValueError(f"cannot batch a conditioning with {what} and one without")
    return None if a is None else (a.cat(b) if isinstance(a, ControlResiduals) else torch.cat([a, b]))


@dataclass(frozen=True)
class Conditioning:
    """Cross-attention `context` (B, tokens, C) plus, for UNets with a `label_emb`, the vector `y`
    (B, adm_in_channels): SDXL's pooled text and size/crop embeddings. SD 1.x leaves `y` None.
    Side inputs for the denoiser travel here too: `control` (side-network residuals for the UNet's skips)
    and `guidance` (B,) (the guidance scale a guidance-distilled model is conditioned on; SD UNets ignore it)."""

    context: Tensor
    y: Tensor | None = None
    control: ControlResiduals | None = None
    guidance: Tensor | None = None

    def __post_init__(self) -> None:
        extras = {"y": self.y, "control": self.control, "guidance": self.guidance}
        for name, extra in extras.items():
            batch = None if extra is None else (extra.batch if isinstance(extra, ControlResiduals) else extra.shape[0])
            if batch is not None and batch != self.batch:
                raise ValueError(f"context and {name} disagree on the batch: {self.batch} vs {batch}")

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def cat(self, other: Conditioning) -> Conditioning:
        """`self` then `other` along the batch (CFG runs uncond and cond in one UNet call); extras included."""
        return Conditioning(
            torch.cat([self.context, other.context]),
            _cat(self.y, other.y, "a vector y"),
            _cat(self.control, other.control, "control residuals"),
            _cat(self.guidance, other.guidance, "a guidance value"),
        )

    def with_control(self, control: ControlResiduals) -> Conditioning:
        """This conditioning with `control` added to the residuals it carries."""
        return replace(self, control=control if self.control is None else self.control.plus(control))

    def repeat(self, n: int) -> Conditioning:
        """A batch of n from a batch of one (expanded views: no copy)."""
        if self.batch != 1:
            raise ValueError(f"repeat expects a batch of one, got {self.batch}")
        y = None if self.y is None else self.y.expand(n, *self.y.shape[1:])
        control = None if self.control is None else self.control.repeat(n)
        guidance = None if self.guidance is None else self.guidance.expand(n, *self.guidance.shape[1:])
        return Conditioning(self.context.expand(n, *self.context.shape[1:]), y, control, guidance)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        y = None if self.y is None else self.y.to(device, dtype)
        control = None if self.control is None else self.control.to(device, dtype)
        guidance = None if self.guidance is None else self.guidance.to(device, dtype)
        return Conditioning(self.context.to(device, dtype), y, control, guidance)

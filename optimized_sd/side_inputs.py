"""Side inputs to a denoiser call, shared by the networks that make them (models/), the conditioning that
carries them (sampling/) and the tasks that wire them (pipelines/): torch only, so no part imports
another part to reach them (as tensor_swap.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ControlResiduals:
    """Side-network residuals for a UNet (ControlNet, Zhang et al. 2023): one per input-block output, in
    order, added to the skip connections, and one added to the middle block's output (diffusers'
    `down_block_additional_residuals` / `mid_block_additional_residual`)."""

    down: tuple[Tensor, ...]
    middle: Tensor

    @property
    def batch(self) -> int:
        return self.middle.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> ControlResiduals:
        return ControlResiduals(tuple(fn(r) for r in self.down), fn(self.middle))

    def _zip(self, other: ControlResiduals, fn: Callable[[Tensor, Tensor], Tensor]) -> ControlResiduals:
        if len(self.down) != len(other.down):
            raise ValueError(f"control residuals disagree on the skips: {len(self.down)} vs {len(other.down)}")
        return ControlResiduals(tuple(fn(a, b) for a, b in zip(self.down, other.down)), fn(self.middle, other.middle))

    def cat(self, other: ControlResiduals) -> ControlResiduals:
        return self._zip(other, lambda a, b: torch.cat([a, b]))

    def plus(self, other: ControlResiduals) -> ControlResiduals:
        """Both sets at once (several side networks add up, as diffusers' MultiControlNet)."""
        return self._zip(other, torch.add)

    def repeat(self, n: int) -> ControlResiduals:
        return self._map(lambda r: r.expand(n, *r.shape[1:]))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ControlResiduals:
        return self._map(lambda r: r.to(device, dtype))

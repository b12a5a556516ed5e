"""The op layer: every weight of the UNet and the VAE reaches compute through these modules.

`Linear` and `Conv2d` are `nn.Linear` / `nn.Conv2d` with two changes:
- no random initialisation: the model is built on the meta device and filled from a checkpoint, and a
  build on the CPU must not spend time drawing numbers that are overwritten at once;
- `forward` reads `compute_weight()` / `compute_bias()`, the one place where a weight becomes the
  tensor that computes. Patches that change what computes (LoRA deltas, storage dtypes such as int8 or
  fp8 with per-channel scales dequantised to the compute dtype, per-layer casts) go there, not into
  the layers that use them. Code that needs the convolution with other arguments (the VAE's row bands
  in `slabs.py`) calls the module, so it gets the same weights."""

from __future__ import annotations

from torch import Tensor, nn


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        """Left uninitialised: checkpoint weights replace them."""

    def compute_weight(self) -> Tensor:
        return self.weight

    def compute_bias(self) -> Tensor | None:
        return self.bias

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.compute_weight(), self.compute_bias())


class Conv2d(nn.Conv2d):
    def reset_parameters(self) -> None:
        """Left uninitialised: checkpoint weights replace them."""

    def compute_weight(self) -> Tensor:
        return self.weight

    def compute_bias(self) -> Tensor | None:
        return self.bias

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.compute_weight(), self.compute_bias())


def default_init(root: nn.Module) -> nn.Module:
    """PyTorch's own random initialisation of every op-layer module under `root`, in module order, for
    the rare model that is not filled from a checkpoint (the benchmark's seeded stand-in weights)."""
    for module in root.modules():
        if isinstance(module, Linear):
            nn.Linear.reset_parameters(module)
        elif isinstance(module, Conv2d):
            nn.Conv2d.reset_parameters(module)
    return root

"""The one way a parameter or buffer is replaced by another tensor, shared by the two parts that place
weights: `memory/` (the offload engine, on every load and release) and `weights/` (`materialize`, which
fills a module whole). Neither may import the other (DESIGN.md), so the swap lives beside them, torch only."""

from __future__ import annotations

from torch import Tensor, nn


def swap_tensor(owner: nn.Module, leaf: str, value: Tensor) -> None:
    """Put `value` in `owner`'s slot `leaf`: a parameter stays a parameter (no autograd: inference
    only; a Parameter given is kept as it is), anything else is a buffer. No copy, no checks: the caller
    placed `value` already."""
    if leaf in owner._parameters:
        owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def set_tensor(root: nn.Module, dotted: str, value: Tensor) -> None:
    """`swap_tensor` addressed by a dotted name under `root`."""
    *path, leaf = dotted.split(".")
    swap_tensor(root.get_submodule(".".join(path)) if path else root, leaf, value)

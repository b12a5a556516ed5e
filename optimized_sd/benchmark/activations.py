"""Activation memory of a denoiser call measured on any device, CPU included: the peak bytes of the tensors the call
creates and holds at once (`LiveTensorMeter`), the CPU's stand-in for CUDA's peak allocated minus the weights.
`benchmarks/calibrate.py --flux` turns it into the planner's per-image-token constant (`TokenActivations`)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorMeter(TorchDispatchMode):
    """Counts the storages that ops create inside the block, each once, until no tensor viewing it is alive, and keeps
    the peak of their sum. Storages that existed before (weights, inputs) are never counted, even when an in-place op
    hands them back."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.before = {tensor.untyped_storage().data_ptr() for tensor in known}
        self.live: dict[int, tuple[int, list[weakref.ref]]] = {}  # storage address -> (bytes, tensors viewing it)
        self.bytes = 0
        self.peak = 0

    def _freed(self, address: int) -> None:
        entry = self.live.get(address)
        if entry is not None and not any(ref() is not None for ref in entry[1]):
            self.bytes -= entry[0]
            del self.live[address]

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address in self.before or storage.nbytes() == 0:
            return
        if address not in self.live:
            self.live[address] = (storage.nbytes(), [])
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
        self.live[address][1].append(weakref.ref(tensor, lambda _, address=address: self._freed(address)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


@dataclass(frozen=True)
class FluxActivationMeasure:
    """Peak activation elements of one Flux transformer call at each image token count (text tokens fixed)."""

    text_tokens: int
    peaks: dict[int, int]  # image tokens -> peak elements

    @property
    def per_joint_token(self) -> float:
        """The slope over image tokens: what each token (image or text: both run through every block) adds."""
        (small, low), (large, high) = sorted(self.peaks.items())[0], sorted(self.peaks.items())[-1]
        return (high - low) / (large - small)

    def per_image_token(self, image_tokens: int, text_tokens: int) -> float:
        """Elements per image token at a size, the text tokens' share included (the planner counts image tokens)."""
        return self.per_joint_token * (image_tokens + text_tokens) / image_tokens


def measure_flux_activations(model: torch.nn.Module, image_tokens: list[int], text_tokens: int, batch: int = 1) -> FluxActivationMeasure:
    """Run `model` (a `models.flux.Flux`, any width) once per image token count (square token grids) and measure each
    call's activation peak, in elements of the call's dtype."""
    from optimized_sd.models.flux import image_ids, text_ids

    config = model.config
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    peaks = {}
    for tokens in image_tokens:
        side = int(round(tokens**0.5))
        inputs = dict(
            img=torch.randn(batch, side * side, config.in_channels, dtype=dtype, device=device),
            img_ids=image_ids(side * 2, side * 2, device),
            txt=torch.randn(batch, text_tokens, config.context_in_dim, dtype=dtype, device=device),
            txt_ids=text_ids(text_tokens, device),
            timesteps=torch.full((batch,), 0.5, dtype=dtype, device=device),
            y=torch.randn(batch, config.vec_in_dim, dtype=dtype, device=device),
            guidance=torch.full((batch,), 3.5, dtype=dtype, device=device) if config.guidance_embed else None,
        )
        known = [*model.parameters(), *model.buffers(), *(value for value in inputs.values() if isinstance(value, torch.Tensor))]
        meter = LiveTensorMeter(known)
        with torch.no_grad(), meter:
            model(**inputs)
        peaks[side * side] = meter.peak // dtype.itemsize
    return FluxActivationMeasure(text_tokens, peaks)

"""The op layer: every weight of the UNet and the VAE reaches compute through these modules.

`Linear` and `Conv2d` are `nn.Linear` / `nn.Conv2d` with two changes:
- no random initialisation: the model is built on the meta device and filled from a checkpoint, and a
  build on the CPU must not spend time drawing numbers that are overwritten at once;
- `forward` reads `compute_weight()` / `compute_bias()`, the one place where a weight becomes the
  tensor that computes. Patches that change what computes (LoRA deltas, storage dtypes such as int8 or
  fp8 with per-channel scales dequantised to the compute dtype, per-layer casts) go there, not into
  the layers that use them. Code that needs the convolution with other arguments (the VAE's row bands
  in `slabs.py`) calls the module, so it gets the same weights.

Stored weights (`--weights`): a layer's `weight` may be kept in a storage dtype other than the compute
dtype: 16-bit (cast at compute) or 8-bit with a `weight_scale` buffer of one scale per output channel,
w = q * scale[oc] (symmetric int8 in [-127, 127], or fp8 e4m3 scaled so each channel's largest value
is fp8's largest). Dequantising per layer at compute keeps the memory engine ignorant of the format: it
only moves the stored bytes.

GGUF weights: a layer may hold a GGUF tensor's raw bytes (a 1-D uint8 `weight`) with its GGML type and
logical shape (`hold_gguf`); they are dequantised per call on the bytes' device, in the compute dtype
(`ggml_quants.dequantize`), so the quantized bytes are what the memory engine stores and moves."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn

from optimized_sd.ggml_quants import GGML_TYPES, tensor_nbytes
from optimized_sd.ggml_quants import dequantize as ggml_dequantize
from optimized_sd.models.runtime import run_options

SCALE = "weight_scale"  # buffer of an 8-bit weight's per-output-channel scales
INT8_LIMIT = 127  # symmetric: -128 is never used, so q and -q are both representable


def channel_view(scale: Tensor, like: Tensor) -> Tensor:
    """(out,) scales shaped to broadcast over a weight (out, in) or (out, in, kh, kw)."""
    return scale.view(-1, *[1] * (like.dim() - 1))


def quantize(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`weight` -> (q, scale) with weight ~= q * scale[oc], one float32 scale per output channel
    (dim 0): int8 rounds to [-127, 127] with scale = absmax / 127; fp8 (e4m3) casts with scale = absmax /
    fp8's largest finite value, so no channel saturates or wastes range. An all-zero channel gets scale 1."""
    w = weight.float()
    absmax = w.abs().flatten(1).amax(1)  # (out,)
    limit = float(INT8_LIMIT) if dtype == torch.int8 else torch.finfo(dtype).max
    scale = torch.where(absmax > 0, absmax / limit, torch.ones_like(absmax))
    scaled = (w / channel_view(scale, w)).clamp(-limit, limit)
    return (scaled.round() if dtype == torch.int8 else scaled).to(dtype), scale


def dequantize(stored: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The weight that computes: the stored tensor in `dtype`, times its channel scales when it has them."""
    weight = stored.to(dtype)
    return weight if scale is None else weight * channel_view(scale.to(dtype), weight)


@dataclass(frozen=True)
class GgufQuant:
    """How a layer's uint8 `weight` bytes read as its weight: GGML type number and the weight's logical shape."""

    qtype: int
    shape: tuple[int, ...]


class WeightOp:
    """What both op modules share: no init, and the one place a weight becomes the tensor that computes.
    Listed first among the bases so `nn.Linear`/`nn.Conv2d`'s constructors call this `reset_parameters`."""

    weight: Tensor
    bias: Tensor | None
    # Patches the computing weight in place at every call (a LoRA on a weight stored in another dtype, which
    # the memory engine cannot patch as it places it: `MemorySession.set_tensor_hook`); None: none.
    weight_patch: Callable[[Tensor], None] | None = None
    # The weight is GGUF bytes of this type and shape (`hold_gguf`); None: a plain tensor.
    gguf_quant: GgufQuant | None = None

    def reset_parameters(self) -> None:
        """Left uninitialised: checkpoint weights replace them."""

    def compute_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight in `dtype` (the input's; None: as stored, or the scale's dtype for an 8-bit weight, float32
        for GGUF bytes), with `weight_patch` applied to a copy (never to the stored weight)."""
        scale = self._buffers.get(SCALE)  # type: ignore[attr-defined]
        if self.gguf_quant is not None:
            weight = ggml_dequantize(self.weight, self.gguf_quant.qtype, self.gguf_quant.shape, dtype or torch.float32)
        elif scale is None and (dtype is None or self.weight.dtype == dtype):
            weight = self.weight
        else:
            weight = dequantize(self.weight, scale, dtype or scale.dtype)
        if self.weight_patch is not None:
            # never patch the stored tensor, nor a view of it (a GGUF F32 weight dequantises to one)
            weight = weight.clone() if weight.data_ptr() == self.weight.data_ptr() else weight
            self.weight_patch(weight)
        return weight

    def compute_bias(self) -> Tensor | None:
        return self.bias

    def hold_gguf(self, raw: Tensor, qtype: int, shape: tuple[int, ...]) -> None:
        """Keep `raw`, a GGUF tensor's bytes (uint8) of GGML type `qtype`, as this layer's weight; it computes
        as the `shape` tensor they encode, which must be the layer's weight shape."""
        expected = tuple(self.weight.shape)
        ggml_type = GGML_TYPES.get(qtype)
        if tuple(shape) != expected or ggml_type is None or raw.dtype != torch.uint8:
            raise ValueError(f"GGUF weight of type {qtype}, shape {tuple(shape)}, {raw.dtype} does not fit a {expected} weight")
        if raw.numel() != tensor_nbytes(ggml_type, math.prod(shape)):
            raise ValueError(f"{raw.numel()} bytes are not a {ggml_type.name} tensor of shape {tuple(shape)}")
        self.weight = nn.Parameter(raw.reshape(-1), requires_grad=False)
        self.gguf_quant = GgufQuant(qtype, tuple(shape))

    def add_weight_scale(self) -> None:
        """Give the layer its 8-bit weight's scale buffer (out,), empty on meta: the memory engine fills it
        like any other tensor, from a source that provides `<key>.weight_scale`."""
        self.register_buffer(SCALE, torch.empty(self.weight.shape[0], device="meta"))  # type: ignore[attr-defined]


class Linear(WeightOp, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        int8 = self.weight.dtype == torch.int8 and self.weight_patch is None  # a patched weight computes dequantised
        if int8 and x.device.type == "cpu" and x.dtype == torch.float32 and run_options().int8_matmul:
            return torch.ops.quantized.linear_dynamic(x, self.prepacked_int8(), True)
        return nn.functional.linear(x, self.compute_weight(x.dtype), self.compute_bias())

    def prepacked_int8(self):  # -> torch.classes.quantized.LinearPackedParamsBase
        """fbgemm's packed form of the int8 weight, its scales and the bias, for dynamic activation
        quantisation (activations quantised per call to 7 bits, `reduce_range`, as fbgemm's AVX2 kernels
        need to stay clear of int16 saturation). Packed once per placement of the weight: the cache is
        keyed by the weight tensor and forgotten when the memory engine drops that tensor."""
        cached = getattr(self, "_int8_packed", None)
        if cached is not None and cached[0]() is self.weight:
            return cached[1]
        scale = self._buffers[SCALE]
        with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; the packed op is what runs
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
            )
            packed = torch.ops.quantized.linear_prepack(qweight, None if self.bias is None else self.bias.float())
        layer = weakref.ref(self)

        def forget(dropped: weakref.ref) -> None:
            owner = layer()
            if owner is not None and getattr(owner, "_int8_packed", (None,))[0] is dropped:
                owner._int8_packed = None

        self._int8_packed = (weakref.ref(self.weight, forget), packed)
        return packed


class Conv2d(WeightOp, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.compute_weight(x.dtype), self.compute_bias())


@cache
def cpu_int8_matmul_available() -> bool:
    """Whether this torch build runs fbgemm's dynamic int8 Linear on this CPU (tried once on a tiny layer)."""
    if not {"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines):
        return False
    try:
        with torch.device("cpu"):
            layer = Linear(4, 2)
        q, scale = quantize(torch.ones(2, 4), torch.int8)
        layer.weight, layer.bias = nn.Parameter(q, requires_grad=False), nn.Parameter(torch.zeros(2), requires_grad=False)
        layer.register_buffer(SCALE, scale)
        out = torch.ops.quantized.linear_dynamic(torch.ones(1, 4), layer.prepacked_int8(), True)
        return bool(torch.allclose(out, torch.full((1, 2), 4.0), rtol=0.05))
    except (RuntimeError, NotImplementedError):
        return False


def adopt_linears(root: nn.Module) -> None:
    """Replace every plain `nn.Linear` under `root` (a third-party model's, e.g. transformers' T5) by this op
    layer's `Linear` of the same shape, device and dtype, so its weights reach compute through `compute_weight`
    too (8-bit weights from the file stay 8-bit; LoRA patches apply). Same arithmetic: `F.linear`."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                weight = child.weight
                setattr(module, name, Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                             device=weight.device, dtype=weight.dtype))  # fmt: skip


def computed_shapes(root: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape as the model computes with it (a GGUF-held weight's logical shape, not its bytes'):
    what LoRA tables are checked against."""
    shapes = {key: tuple(value.shape) for key, value in root.state_dict().items()}
    for path, module in root.named_modules():
        if isinstance(module, WeightOp) and module.gguf_quant is not None:
            shapes[f"{path}.weight" if path else "weight"] = module.gguf_quant.shape
    return shapes


def default_init(root: nn.Module) -> nn.Module:
    """PyTorch's own random initialisation of every op-layer module under `root`, in module order, for
    the rare model that is not filled from a checkpoint (the benchmark's seeded stand-in weights)."""
    for module in root.modules():
        if isinstance(module, Linear):
            nn.Linear.reset_parameters(module)
        elif isinstance(module, Conv2d):
            nn.Conv2d.reset_parameters(module)
    return root

"""GGML's block formats (the tensor types of a GGUF file): names, block sizes, and vectorised torch
dequantisation, shared by the two parts that meet quantized bytes: `weights/gguf.py` (the reader) and
`models/ops.py` (a layer holding GGUF bytes, dequantised per forward). Neither may import the other
(DESIGN.md), so the formats live beside them, torch only, like `tensor_swap`.

Every format is a run of fixed-size blocks laid end to end along the tensor's innermost dimension; a
block of `block_size` values takes `type_size` bytes, all little-endian. Dequantisation reads the whole
tensor as a (blocks, bytes) uint8 table and computes every block at once (no per-block Python), in
float32 with the same operations in the same order as GGML's reference (so results are bit-exact), on
whatever device the bytes are. K-quants ("super-blocks" of 256 values) are described at their functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

QK_K = 256  # values in a K-quant super-block


class GgmlType(NamedTuple):
    """One tensor type: its GGML number and name, and `type_size` bytes per `block_size` values."""

    number: int
    name: str
    block_size: int
    type_size: int


# Every type GGML numbers (ggml.h's `enum ggml_type`), so an unsupported one is named in the refusal; sizes
# are given for the types read here.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

_SIZES = {  # name -> (block_size, type_size)
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 2 + 32),  # d f16, 32 x int8
    "Q4_0": (32, 2 + 16),  # d f16, 32 x 4 bits
    "Q4_1": (32, 2 + 2 + 16),  # d f16, m f16, 32 x 4 bits
    "Q5_0": (32, 2 + 4 + 16),  # d f16, 32 high bits, 32 x 4 low bits
    "Q5_1": (32, 2 + 2 + 4 + 16),  # d f16, m f16, 32 high bits, 32 x 4 low bits
    "Q2_K": (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    "Q3_K": (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    "Q4_K": (QK_K, 2 + 2 + 12 + QK_K // 2),
    "Q5_K": (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}
_NUMBERS = {name: number for number, name in GGML_TYPE_NAMES.items()}
GGML_TYPES: dict[int, GgmlType] = {_NUMBERS[name]: GgmlType(_NUMBERS[name], name, *sizes) for name, sizes in _SIZES.items()}
SUPPORTED_NAMES = ", ".join(_SIZES)
FLOAT_TYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def type_name(number: int) -> str:
    return GGML_TYPE_NAMES.get(number, "unknown")


def tensor_nbytes(ggml_type: GgmlType, elements: int) -> int:
    """Bytes of `elements` values (a whole number of blocks: callers check the innermost size)."""
    return elements // ggml_type.block_size * ggml_type.type_size


# --- pieces of a block ---------------------------------------------------------------------------


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The fp16 field at byte `start` of every block, as float32 (blocks, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor, groups: int) -> Tensor:
    """4-bit values of `qs` (blocks, groups * n): in each group of n bytes, the n low nibbles come first and
    then the n high ones -> (blocks, groups * 2 * n)."""
    grouped = qs.reshape(qs.shape[0], groups, -1)
    return torch.stack([grouped & 0x0F, grouped >> 4], dim=2).reshape(qs.shape[0], -1)


def _bits(data: Tensor, per_byte: int, groups: int) -> Tensor:
    """Fields of 8/per_byte bits of `data` (blocks, groups * n): in each group of n bytes, field j of all n
    bytes (from the low bits up) comes before field j+1 -> (blocks, groups * per_byte * n). One op per field
    position with a scalar shift (vectorised; a broadcast tensor of shifts runs at half the speed)."""
    width = 8 // per_byte
    grouped = data.reshape(data.shape[0], groups, -1)
    fields = [(grouped >> shift) & ((1 << width) - 1) for shift in range(0, 8, width)]
    return torch.stack(fields, dim=2).reshape(data.shape[0], -1)


def _k_scales_mins(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (blocks, 8) as float32. Bytes 0-3
    hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the mins; bytes
    8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    low_scales, low_mins, tails = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low_scales & 0x3F, (tails & 0x0F) | ((low_scales >> 6) << 4)], dim=1)
    mins = torch.cat([low_mins & 0x3F, (tails >> 4) | ((low_mins >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _scaled(scale: Tensor, q: Tensor, shift: Tensor | None = None, subtract: bool = False) -> Tensor:
    """scale * q (+ or - shift), with `q` 8-bit: cast once into the result, then multiplied and shifted in place,
    so the only full-size float tensor is the result (on the CPU each new one costs its page faults, more than
    the arithmetic) and every op runs on one dtype (mixed-dtype ops take torch's slow casting loop)."""
    out = q.contiguous().view(*scale.shape[:-1], -1).to(torch.float32)  # a strided cast is not vectorised
    out.mul_(scale)
    if shift is not None:
        (out.sub_ if subtract else out.add_)(shift)
    return out.view(q.shape[0], -1)


def _centred(q: Tensor, offset: int) -> Tensor:
    """Unsigned values 0..2*offset-1 -> int8 in -offset..offset-1, in place (`q` is a fresh intermediate)."""
    return q.view(torch.int8).sub_(offset)


def _with_high(low: Tensor, high: Tensor, shift: int) -> Tensor:
    """low | high << shift, in place on the fresh intermediates (each new tensor costs its page faults)."""
    return low.bitwise_or_(high.bitwise_left_shift_(shift))


# --- one function per format: (blocks, type_size) uint8 -> (blocks, block_size) float32 -------------


def _q8_0(blocks: Tensor) -> Tensor:
    return _scaled(_f16(blocks, 0), blocks[:, 2:].view(torch.int8))


def _q4_0(blocks: Tensor) -> Tensor:
    """Value j is the low nibble of byte j, value j+16 the high nibble; centred on 8."""
    return _scaled(_f16(blocks, 0), _centred(_nibbles(blocks[:, 2:], 1), 8))


def _q4_1(blocks: Tensor) -> Tensor:
    return _scaled(_f16(blocks, 0), _nibbles(blocks[:, 4:], 1), _f16(blocks, 2))


def _five_bits(high: Tensor, low: Tensor) -> Tensor:
    """Q5_0/Q5_1's values: 4 low bits as Q4, the fifth from bit j of the 32-bit little-endian `high`."""
    return _with_high(_nibbles(low, 1), _bits(high, 8, 4), 4)


def _q5_0(blocks: Tensor) -> Tensor:
    return _scaled(_f16(blocks, 0), _centred(_five_bits(blocks[:, 2:6], blocks[:, 6:]), 16))


def _q5_1(blocks: Tensor) -> Tensor:
    return _scaled(_f16(blocks, 0), _five_bits(blocks[:, 4:8], blocks[:, 8:]), _f16(blocks, 2))


def _q2_k(blocks: Tensor) -> Tensor:
    """16 scale bytes (low nibble: scale, high nibble: min, one per 16 values), 64 bytes of 2-bit values,
    d, dmin. The values: two halves of 128, each from 32 bytes read at shifts 0, 2, 4, 6 (32 values each).
    w = d * scale * q - dmin * min."""
    n = blocks.shape[0]
    packed = blocks[:, :16]
    scale = (_f16(blocks, 80) * (packed & 0x0F).float()).view(n, 16, 1)
    minimum = (_f16(blocks, 82) * (packed >> 4).float()).view(n, 16, 1)
    return _scaled(scale, _bits(blocks[:, 16:80], 4, 2), minimum, subtract=True)


def _q3_k(blocks: Tensor) -> Tensor:
    """32 bytes of high bits, 64 bytes of 2-bit low parts (laid out as Q2_K's), 12 bytes of 16 six-bit
    scales, d. Value i's high bit is bit i // 32 of byte i % 32; a clear bit subtracts 4. Scale j: low 4 bits
    from byte j % 8 (low nibble for j < 8), top 2 bits from byte 8 + j % 4 at shift 2 * (j // 4); centred on 32.
    w = d * scale * q."""
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    scales = _centred(_with_high(_nibbles(packed[:, :8], 1), _bits(packed[:, 8:], 4, 1), 4), 32)
    scale = (_f16(blocks, 108) * scales.float()).view(n, 16, 1)
    minus_four = _bits(blocks[:, :32], 8, 1).bitwise_xor_(1).bitwise_left_shift_(2)  # 4 where the high bit is clear
    return _scaled(scale, _bits(blocks[:, 32:96], 4, 2).view(torch.int8).sub_(minus_four.view(torch.int8)))


def _k_affine(blocks: Tensor, q: Tensor) -> Tensor:
    """Q4_K/Q5_K's w = d * scale * q - dmin * min, per sub-block of 32 (bytes 0-15: d, dmin, the packed scales)."""
    n = blocks.shape[0]
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * scales).view(n, 8, 1)
    minimum = (_f16(blocks, 2) * mins).view(n, 8, 1)
    return _scaled(scale, q, minimum, subtract=True)


def _q4_k(blocks: Tensor) -> Tensor:
    """d, dmin, 12 bytes of scales/mins, 128 bytes of 4-bit values: four chunks of 32 bytes, whose low
    nibbles are one sub-block of 32 and high nibbles the next."""
    return _k_affine(blocks, _nibbles(blocks[:, 16:], 4))


def _q5_k(blocks: Tensor) -> Tensor:
    """Q4_K plus 32 bytes of fifth bits before the nibbles: sub-block s takes bit s of the 32 bytes."""
    return _k_affine(blocks, _with_high(_nibbles(blocks[:, 48:], 4), _bits(blocks[:, 16:48], 8, 1), 4))


def _q6_k(blocks: Tensor) -> Tensor:
    """128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales (one per 16 values), d. Each
    half of 128 values: low nibbles of its 64 bytes then high nibbles; high parts from its 32 bytes at
    shifts 0, 2, 4, 6. Centred on 32. w = d * scale * q."""
    n = blocks.shape[0]
    scale = (_f16(blocks, 208) * blocks[:, 192:208].contiguous().view(torch.int8).float()).view(n, 16, 1)
    return _scaled(scale, _centred(_with_high(_nibbles(blocks[:, :128], 2), _bits(blocks[:, 128:192], 4, 2), 4), 32))


_BLOCK_DEQUANTIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize(raw: Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A tensor's values from its GGML bytes: `raw` (uint8, exactly the tensor's bytes, on any device) of type
    `qtype` -> a `shape` tensor in `dtype` on the same device. Computed in float32 and cast at the end, so the
    float32 result equals GGML's reference bit for bit. F32/F16/BF16 bytes are reinterpreted, not copied
    where `dtype` is theirs (the result may then share memory with `raw`)."""
    ggml_type = GGML_TYPES.get(qtype)
    if ggml_type is None:
        raise ValueError(f"GGML type {qtype} ({type_name(qtype)}) is not supported; supported: {SUPPORTED_NAMES}")
    elements = math.prod(shape)
    if raw.dtype != torch.uint8 or raw.numel() != tensor_nbytes(ggml_type, elements) or elements % ggml_type.block_size:
        raise ValueError(f"{ggml_type.name} bytes {tuple(raw.shape)} {raw.dtype} do not hold a {tuple(shape)} tensor")
    flat = raw.reshape(-1)
    if qtype in FLOAT_TYPES:
        return flat.view(FLOAT_TYPES[qtype]).view(shape).to(dtype)
    values = _BLOCK_DEQUANTIZERS[ggml_type.name](flat.view(-1, ggml_type.type_size))
    return values.view(shape).to(dtype)

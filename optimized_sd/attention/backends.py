"""Attention backends: one signature `(q, k, v) -> out`, each registered with the condition it needs.

All backends take q of shape (B, heads, Nq, d) and k, v of shape (B, heads, Nk, d) and return
softmax(q k^T / sqrt(d)) v of shape (B, heads, Nq, d). No mask: SD 1.x never needs one.
Nothing here touches a device or imports an optional package at import time; the xformers
import happens inside the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# Returns None when the backend can run for (device, dtype), else a one-line reason why not.
# dtype None asks about the device only (what the CLI knows before any tensor exists).
Condition = Callable[[torch.device, "torch.dtype | None"], "str | None"]

XFORMERS_MISSING = (
    "xformers needs the xformers package: pip install optimized-sd[xformers]"
)

# The CPU cap on one slice's score memory: small slices stay in L2/L3 and are no slower
# (InvokeAI measured the same), and 64 MiB keeps a 4096x4096 self-attention far below RAM.
CPU_SLICE_BUDGET_BYTES = 64 * 2**20
# On CUDA a slice may use this fraction of what the allocator can still hand out, leaving
# room for fragmentation and for the q/k/v/out tensors that already live alongside it.
CUDA_FREE_FRACTION = 0.4


@dataclass(frozen=True)
class Backend:
    """A registered backend: its function and the condition under which it can run."""

    name: str
    fn: AttentionFn
    unavailable: Condition


def _always(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Condition for backends that run anywhere torch runs."""
    return None


# --------------------------------------------------------------------------- naive
def naive_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The reference: explicit matmuls and softmax, all in float32, cast back to q's dtype.

    Materialises the full (Nq x Nk) score matrix per head, so it is for tests, not for 1024^2.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, heads, Nq, Nk)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)  # (B, heads, Nq, d)


# --------------------------------------------------------------------------- sdpa
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch's fused kernel: picks flash / memory-efficient / math by itself per device."""
    return F.scaled_dot_product_attention(q, k, v)


# --------------------------------------------------------------------------- xformers
def _import_xformers_ops() -> ModuleType | None:
    """Import xformers.ops on demand; None when it is not installed (or a broken install)."""
    try:
        import xformers.ops as xops  # noqa: PLC0415 - optional, never imported at module load
    except ImportError:
        return None
    return xops


def _xformers_unavailable(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if _import_xformers_ops() is None:
        return XFORMERS_MISSING
    if device.type != "cuda":
        return f"xformers needs a CUDA device; this run uses {device.type}"
    return None


def xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """xformers' memory-efficient kernel; it wants (B, N, heads, d), so transpose in and out."""
    xops = _import_xformers_ops()
    if xops is None:
        raise RuntimeError(XFORMERS_MISSING)
    # (B, heads, N, d) -> (B, N, heads, d); free when q came from a (B, N, heads, d) view.
    qx, kx, vx = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = xops.memory_efficient_attention(qx, kx, vx)  # (B, Nq, heads, d)
    return out.transpose(1, 2)  # (B, heads, Nq, d)


# --------------------------------------------------------------------------- sliced
def slice_rows(n_rows_total: int, bytes_per_row: int, budget_bytes: int) -> int:
    """Rows per slice so that one slice's scores fit `budget_bytes`; slices are balanced.

    Balanced means ceil-divided into equal parts (4096 rows at a 3000-row cap -> 2048, not
    3000 + 1096), so the last slice is not a tiny straggler. Never below 1: a single row that
    exceeds the budget still has to run.
    """
    if n_rows_total < 0 or bytes_per_row <= 0 or budget_bytes < 0:
        raise ValueError(
            f"slice_rows needs n_rows_total >= 0, bytes_per_row > 0, budget_bytes >= 0; got "
            f"{n_rows_total}, {bytes_per_row}, {budget_bytes}"
        )
    if n_rows_total == 0:
        return 1
    max_rows = max(1, budget_bytes // bytes_per_row)
    if max_rows >= n_rows_total:
        return n_rows_total
    n_slices = -(-n_rows_total // max_rows)
    return -(-n_rows_total // n_slices)


def score_bytes_per_row(n_keys: int, dtype: torch.dtype) -> int:
    """Peak bytes one query row costs in `_attend_chunk`: scores in `dtype` plus their float32 copy.

    For float32 there is no copy (`.float()` is a no-op and the softmax runs in place); the
    second 4 bytes are kept as headroom for matmul workspace rather than tuned away.
    """
    return n_keys * (dtype.itemsize + 4)


def slice_budget_bytes(device: torch.device) -> int:
    """The score-memory budget for one slice: a fraction of free CUDA memory, else a fixed cap."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory the caching allocator holds but does not use is also free for us.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + cached) * CUDA_FREE_FRACTION)
    return CPU_SLICE_BUDGET_BYTES


def _attend_chunk(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Attention for one slice, (n, m, d) x (n, Nk, d) -> (n, m, d); softmax in float32, in place.

    The scale is folded into q so fp16 scores stay small; the softmax runs in place so the
    slice holds one float32 score matrix, which is what `score_bytes_per_row` budgets for.
    """
    scores = torch.bmm(q * scale, k.transpose(1, 2)).float()  # (n, m, Nk)
    scores -= scores.amax(dim=-1, keepdim=True)
    scores.exp_()
    scores /= scores.sum(dim=-1, keepdim=True)
    return torch.bmm(scores.to(v.dtype), v)  # (n, m, d)


def sliced_attention(
    q: Tensor, k: Tensor, v: Tensor, *, budget_bytes: int | None = None
) -> Tensor:
    """Attention a slice of (batch*heads, queries) at a time so no slice's scores pass the budget.

    Whole heads are grouped while a head fits; otherwise each head's queries are split.
    `budget_bytes` None means `slice_budget_bytes(q.device)`.
    """
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    if budget_bytes is None:
        budget_bytes = slice_budget_bytes(q.device)
    bh = b * h
    q3 = q.reshape(bh, nq, d)  # (B*heads, Nq, d)
    k3 = k.reshape(bh, nk, d)  # (B*heads, Nk, d)
    v3 = v.reshape(bh, nk, dv)  # (B*heads, Nk, d)
    per_row = score_bytes_per_row(nk, q.dtype)
    rows = slice_rows(bh * nq, per_row, budget_bytes)
    if rows >= nq:
        heads_step, q_step = max(1, rows // nq), nq
    else:
        heads_step, q_step = 1, slice_rows(nq, per_row, budget_bytes)
    scale = 1.0 / math.sqrt(d)
    out = q.new_empty(bh, nq, dv)  # (B*heads, Nq, d)
    for h0 in range(0, bh, heads_step):
        h1 = min(h0 + heads_step, bh)
        for q0 in range(0, nq, q_step):
            q1 = min(q0 + q_step, nq)
            out[h0:h1, q0:q1] = _attend_chunk(q3[h0:h1, q0:q1], k3[h0:h1], v3[h0:h1], scale)
    return out.reshape(b, h, nq, dv)  # (B, heads, Nq, d)


def _sliced(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return sliced_attention(q, k, v)


# --------------------------------------------------------------------------- registry
# Order is the order users see in `--attention` help; "sdpa" first because it is the default.
REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("sdpa", sdpa_attention, _always),
        Backend("xformers", xformers_attention, _xformers_unavailable),
        Backend("sliced", _sliced, _always),
        Backend("naive", naive_attention, _always),
    )
}

"""One attention entry point with swappable backends (sdpa, xformers, sliced, naive reference).

    with use_attention("sliced"):
        out = attention(q, k, v)   # q: (B, heads, Nq, d), k/v: (B, heads, Nk, d)

Backends are chosen per context and resolved per call; nothing is probed at import.
"""

from optimized_sd.attention.backends import (
    CPU_SLICE_BUDGET_BYTES,
    REGISTRY,
    Backend,
    naive_attention,
    sdpa_attention,
    slice_budget_bytes,
    slice_rows,
    sliced_attention,
    xformers_attention,
)
from optimized_sd.attention.dispatch import (
    ATTENTION_BACKENDS,
    DEFAULT_BACKEND,
    attention,
    check_backend,
    current_attention,
    resolve_backend,
    use_attention,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "CPU_SLICE_BUDGET_BYTES",
    "DEFAULT_BACKEND",
    "REGISTRY",
    "Backend",
    "attention",
    "check_backend",
    "current_attention",
    "naive_attention",
    "resolve_backend",
    "sdpa_attention",
    "slice_budget_bytes",
    "slice_rows",
    "sliced_attention",
    "use_attention",
    "xformers_attention",
]

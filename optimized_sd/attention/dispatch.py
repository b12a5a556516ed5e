"""The one attention entry point and the per-context backend choice.

The choice lives in a ContextVar, set by `use_attention` for a dynamic extent, so two pipelines
in two threads (or tasks) can use different backends and nothing is decided at import time.
Each call resolves the selected backend against q's device and dtype. A fallback is reported once
per outermost `use_attention` block (a pipeline opens one per generation call): no process-wide
cache, so a long-lived server says it again on its next call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from optimized_sd.attention.backends import REGISTRY
from optimized_sd.errors import FieldError, UserError

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "sdpa"
ATTENTION_BACKENDS: tuple[str, ...] = tuple(REGISTRY)

_selected: ContextVar[str] = ContextVar("optimized_sd_attention_backend", default=DEFAULT_BACKEND)
# (backend, reason) fallbacks already reported in the outermost `use_attention` block; None outside any.
_reported: ContextVar[set[tuple[str, str]] | None] = ContextVar("optimized_sd_attention_reported", default=None)


def _require_known(name: str) -> None:
    if name not in REGISTRY:
        raise UserError(
            f"unknown attention backend {name!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}"
        )


def check_backend(name: str, device: torch.device | str) -> None:
    """Fail early, as a one-line FieldError naming the `attention` option, if backend `name` cannot run on `device`.

    The CLI calls this before loading anything, so a bad `--attention` costs no model load.
    """
    _require_known(name)
    reason = REGISTRY[name].unavailable(torch.device(device), None)
    if reason is not None:
        raise FieldError.about("attention", reason)


@contextmanager
def use_attention(name: str) -> Iterator[str]:
    """Select backend `name` for every `attention` call in this with-block; restore on exit."""
    _require_known(name)
    token = _selected.set(name)
    reported_token = _reported.set(set()) if _reported.get() is None else None
    try:
        yield name
    finally:
        if reported_token is not None:
            _reported.reset(reported_token)
        _selected.reset(token)


def current_attention() -> str:
    """The backend name selected for this context (what `attention` will try first)."""
    return _selected.get()


def _warn_fallback(name: str, reason: str, fallback: str) -> None:
    """Say once per (backend, reason) and outermost `use_attention` block that a call fell back,
    rather than once per layer; outside any block, every time."""
    reported = _reported.get()
    if reported is not None:
        if (name, reason) in reported:
            return
        reported.add((name, reason))
    log.warning("attention backend %r cannot run here (%s); using %r", name, reason, fallback)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run for a call on (device, dtype): `name`, or the default if it can't.

    Falling back (with a warning) rather than raising keeps a run alive when one stage sits on
    another device than the one `check_backend` validated, e.g. a VAE kept on the CPU.
    """
    _require_known(name)
    reason = REGISTRY[name].unavailable(device, dtype)
    if reason is None:
        return name
    _warn_fallback(name, reason, DEFAULT_BACKEND)
    return DEFAULT_BACKEND


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with the backend selected for this context.

    q: (B, heads, Nq, d); k, v: (B, heads, Nk, d) -> (B, heads, Nq, d).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention wants 4-D (B, heads, N, d) tensors; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    name = resolve_backend(_selected.get(), q.device, q.dtype)
    return REGISTRY[name].fn(q, k, v)

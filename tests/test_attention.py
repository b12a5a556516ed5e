"""Every attention backend against the naive float32 reference, plus selection and checks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from optimized_sd.attention import (
    ATTENTION_BACKENDS,
    REGISTRY,
    Backend,
    attention,
    check_backend,
    current_attention,
    naive_attention,
    slice_rows,
    sliced_attention,
    use_attention,
    xformers_attention,
)
from optimized_sd.attention import backends as backends_mod
from optimized_sd.attention import dispatch as dispatch_mod
from optimized_sd.errors import UserError

CPU = torch.device("cpu")

# (B, heads, Nq, Nk, d): self-attention, SD's cross-attention (4096 x 77 scaled down to 256 x 77),
# head dims 40/80/160 as in SD 1.x's three levels, and odd sizes that do not divide evenly.
SHAPES = [
    (2, 8, 64, 64, 40),
    (2, 8, 256, 77, 40),
    (1, 8, 128, 128, 80),
    (2, 4, 96, 77, 160),
    (1, 3, 37, 11, 24),
    (1, 1, 1, 5, 8),
]


def _qkv(shape: tuple[int, int, int, int, int], dtype=torch.float32, device=CPU, seed=0):
    b, h, nq, nk, d = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, d, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _runs_on(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    return REGISTRY[name].unavailable(device, dtype) is None


CPU_BACKENDS = [n for n in ATTENTION_BACKENDS if n != "naive" and _runs_on(n, CPU, torch.float32)]


def test_backend_names_and_default() -> None:
    assert ATTENTION_BACKENDS == ("sdpa", "xformers", "sliced", "naive")
    assert current_attention() == "sdpa"


def test_naive_matches_textbook_formula() -> None:
    """Pin the reference itself to softmax(q k^T / sqrt(d)) v computed in float64."""
    q, k, v = _qkv((1, 2, 9, 7, 16))
    q64, k64, v64 = q.double(), k.double(), v.double()
    expected = torch.softmax(q64 @ k64.transpose(-1, -2) / 16**0.5, dim=-1) @ v64
    assert (naive_attention(q, k, v).double() - expected).abs().max() < 1e-6


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_naive_fp32(name: str, shape) -> None:
    q, k, v = _qkv(shape)
    with use_attention(name):
        out = attention(q, k, v)
    ref = naive_attention(q, k, v)
    assert out.shape == ref.shape == (shape[0], shape[1], shape[2], shape[4])
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backend_matches_naive_half_on_cpu(name: str, dtype: torch.dtype) -> None:
    """Half inputs: compared with naive on the same half inputs (naive upcasts internally)."""
    q, k, v = _qkv((2, 8, 256, 77, 40), dtype=dtype)
    with use_attention(name):
        out = attention(q, k, v)
    ref = naive_attention(q, k, v)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (out.float() - ref.float()).abs().max().item() <= tol


# --------------------------------------------------------------------------- sliced
@pytest.fixture
def chunk_spy(monkeypatch):
    """Count `_attend_chunk` calls and record each slice's (heads, queries) extent."""
    calls: list[tuple[int, int]] = []
    real = backends_mod._attend_chunk

    def spy(q, k, v, scale):
        calls.append((q.shape[0], q.shape[1]))
        return real(q, k, v, scale)

    monkeypatch.setattr(backends_mod, "_attend_chunk", spy)
    return calls


def test_sliced_default_budget_is_one_slice_for_small_inputs(chunk_spy) -> None:
    q, k, v = _qkv((2, 8, 64, 64, 40))
    sliced_attention(q, k, v)
    assert chunk_spy == [(16, 64)]


def test_sliced_groups_whole_heads_when_a_head_fits(chunk_spy) -> None:
    q, k, v = _qkv((2, 8, 64, 64, 40))
    per_head = 64 * backends_mod.score_bytes_per_row(64, torch.float32)
    out = sliced_attention(q, k, v, budget_bytes=3 * per_head)
    # 16 heads at most 3 per slice -> balanced to 6 slices of <= 3 heads, all queries each.
    assert len(chunk_spy) > 1
    assert all(nq == 64 and n <= 3 for n, nq in chunk_spy)
    assert sum(n for n, _ in chunk_spy) == 16
    assert (out - naive_attention(q, k, v)).abs().max().item() <= 1e-5


def test_sliced_splits_queries_within_a_head(chunk_spy) -> None:
    q, k, v = _qkv((1, 2, 100, 77, 40))
    per_row = backends_mod.score_bytes_per_row(77, torch.float32)
    out = sliced_attention(q, k, v, budget_bytes=30 * per_row)
    # 100 queries at <= 30 rows -> 4 balanced slices of 25 per head, 2 heads.
    assert chunk_spy == [(1, 25)] * 8
    assert (out - naive_attention(q, k, v)).abs().max().item() <= 1e-5


def test_sliced_zero_budget_runs_one_row_at_a_time(chunk_spy) -> None:
    q, k, v = _qkv((1, 2, 7, 5, 8))
    out = sliced_attention(q, k, v, budget_bytes=0)
    assert chunk_spy == [(1, 1)] * 14
    assert (out - naive_attention(q, k, v)).abs().max().item() <= 1e-5


def test_sliced_through_attention_uses_the_cpu_cap(chunk_spy, monkeypatch) -> None:
    """The dispatched backend reads the CPU cap per call; shrink it and the call slices."""
    q, k, v = _qkv((1, 4, 128, 128, 40))
    monkeypatch.setattr(backends_mod, "CPU_SLICE_BUDGET_BYTES", 16 * 1024)
    with use_attention("sliced"):
        out = attention(q, k, v)
    assert len(chunk_spy) > 1
    assert (out - naive_attention(q, k, v)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("n", "per_row", "budget", "expected"),
    [
        (4096, 100, 10**9, 4096),  # fits: one slice
        (4096, 100, 409600, 4096),  # exactly fits
        (4096, 100, 300000, 2048),  # cap 3000 -> 2 balanced slices, not 3000 + 1096
        (4096, 100, 100000, 820),  # cap 1000 -> 5 slices of <= 820
        (10, 100, 99, 1),  # one row exceeds the budget: still 1
        (10, 100, 0, 1),
        (0, 100, 1000, 1),  # nothing to do: a valid step of 1
        (7, 1, 3, 3),  # 7 rows at <= 3 -> 3 slices: 3, 3, 1 (ceil(7/3) = 3)
    ],
)
def test_slice_rows(n: int, per_row: int, budget: int, expected: int) -> None:
    rows = slice_rows(n, per_row, budget)
    assert rows == expected
    assert rows * per_row <= budget or rows == 1
    assert 1 <= rows <= max(1, n)


def test_slice_rows_keeps_slice_count_minimal() -> None:
    for n in (1, 7, 77, 4096, 8 * 4096):
        for cap in (1, 3, 64, 1000, 5000):
            rows = slice_rows(n, 1, cap)
            assert rows <= cap
            assert -(-n // rows) == -(-n // min(cap, n))


@pytest.mark.parametrize("args", [(-1, 1, 1), (1, 0, 1), (1, 1, -1)])
def test_slice_rows_rejects_nonsense(args) -> None:
    with pytest.raises(ValueError):
        slice_rows(*args)


# --------------------------------------------------------------------------- selection
def test_use_attention_nests_and_restores() -> None:
    assert current_attention() == "sdpa"
    with use_attention("sliced") as name:
        assert name == "sliced" and current_attention() == "sliced"
        with use_attention("naive"):
            assert current_attention() == "naive"
        assert current_attention() == "sliced"
    assert current_attention() == "sdpa"


def test_use_attention_restores_after_an_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with use_attention("naive"):
            raise RuntimeError("boom")
    assert current_attention() == "sdpa"


def test_use_attention_rejects_unknown_names() -> None:
    with pytest.raises(UserError, match="unknown attention backend 'flash'"):
        with use_attention("flash"):
            pass
    assert current_attention() == "sdpa"


def test_selection_is_per_thread() -> None:
    seen: list[str] = []
    with use_attention("naive"):
        t = threading.Thread(target=lambda: seen.append(current_attention()))
        t.start()
        t.join()
        assert current_attention() == "naive"
    assert seen == ["sdpa"]


def test_attention_calls_the_selected_backend(monkeypatch) -> None:
    called: list[str] = []

    def make_spy(name: str):
        real = REGISTRY[name]

        def spy(q, k, v):
            called.append(name)
            return real.fn(q, k, v)

        return Backend(name, spy, real.unavailable)

    for name in ("sdpa", "sliced", "naive"):
        monkeypatch.setitem(REGISTRY, name, make_spy(name))
    q, k, v = _qkv((1, 2, 8, 8, 8))
    attention(q, k, v)
    with use_attention("sliced"):
        attention(q, k, v)
        with use_attention("naive"):
            attention(q, k, v)
    attention(q, k, v)
    assert called == ["sdpa", "sliced", "naive", "sdpa"]


def test_attention_rejects_bad_shapes() -> None:
    q, k, v = _qkv((1, 2, 8, 6, 8))
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k, v[:, :, :3])


# --------------------------------------------------------------------------- check_backend
@pytest.fixture
def no_xformers(monkeypatch):
    """Make `import xformers.ops` fail, whether or not xformers is installed."""
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)


@pytest.fixture
def fake_xformers(monkeypatch):
    """A stand-in xformers.ops whose kernel checks the (B, N, heads, d) layout it is given."""
    calls: list[tuple[int, ...]] = []

    def memory_efficient_attention(q, k, v):
        calls.append(tuple(q.shape))
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        bhnd = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return bhnd.transpose(1, 2)

    pkg = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    pkg.ops = ops  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return calls


@pytest.mark.parametrize("name", ["sdpa", "sliced", "naive"])
def test_check_backend_accepts_portable_backends_on_cpu(name: str) -> None:
    check_backend(name, torch.device("cpu"))
    check_backend(name, "cpu")


def test_check_backend_unknown_lists_valid_names() -> None:
    with pytest.raises(UserError) as err:
        check_backend("flash", torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "'flash'" in msg and "sdpa, xformers, sliced, naive" in msg


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_check_backend_xformers_missing(no_xformers, device: str) -> None:
    with pytest.raises(UserError) as err:
        check_backend("xformers", torch.device(device))
    assert str(err.value) == (
        "attention xformers needs the xformers package: pip install optimized-sd[xformers]"
    )


def test_check_backend_xformers_needs_cuda(fake_xformers) -> None:
    with pytest.raises(UserError, match="needs a CUDA device; this run uses cpu"):
        check_backend("xformers", torch.device("cpu"))
    check_backend("xformers", torch.device("cuda"))  # installed + CUDA device: accepted


def test_xformers_backend_transposes_layout(fake_xformers) -> None:
    q, k, v = _qkv((2, 8, 64, 77, 40))
    out = xformers_attention(q, k, v)
    assert fake_xformers == [(2, 64, 8, 40)]  # (B, N, heads, d) went in
    assert out.shape == (2, 8, 64, 40)
    assert (out - naive_attention(q, k, v)).abs().max().item() <= 1e-6


def test_unrunnable_selection_falls_back_to_sdpa_with_a_warning(no_xformers, caplog) -> None:
    q, k, v = _qkv((1, 2, 16, 16, 8))
    with caplog.at_level(logging.WARNING, logger=dispatch_mod.__name__):
        with use_attention("xformers"):
            out = attention(q, k, v)
            with use_attention("xformers"):  # a stage inside a call: still the same call
                attention(q, k, v)
    assert (out - naive_attention(q, k, v)).abs().max().item() <= 1e-5
    warnings = [r for r in caplog.records if "cannot run here" in r.getMessage()]
    assert len(warnings) == 1  # once, not once per layer
    assert "'sdpa'" in warnings[0].getMessage()
    with caplog.at_level(logging.WARNING, logger=dispatch_mod.__name__):
        with use_attention("xformers"):  # the next call of a long-lived process is told again
            attention(q, k, v)
    assert len([r for r in caplog.records if "cannot run here" in r.getMessage()]) == 2


def test_import_probes_nothing() -> None:
    """Importing the package must not import xformers or initialise CUDA."""
    code = (
        "import sys, torch\n"
        "import optimized_sd.attention\n"
        "assert 'xformers' not in sys.modules, 'xformers imported at import time'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import time'\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


# --------------------------------------------------------------------------- CUDA only
def _xformers_installed() -> bool:
    return backends_mod._import_xformers_ops() is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sdpa", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_cuda_backend_matches_naive(name: str, dtype: torch.dtype) -> None:
    q, k, v = _qkv((2, 8, 1024, 1024, 40), dtype=dtype, device=torch.device("cuda"))
    with use_attention(name):
        out = attention(q, k, v)
    ref = naive_attention(q, k, v)
    tol = 2e-3 if dtype == torch.float16 else 1e-4  # TF32 / fused kernels on GPU
    assert (out.float() - ref.float()).abs().max().item() <= tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_slice_budget_is_a_fraction_of_free_memory() -> None:
    dev = torch.device("cuda")
    budget = backends_mod.slice_budget_bytes(dev)
    _free, total = torch.cuda.mem_get_info(dev)
    assert 0 < budget < total


@pytest.mark.skipif(
    not (torch.cuda.is_available() and _xformers_installed()),
    reason="needs the xformers package and a CUDA device",
)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_xformers_matches_naive_on_cuda(shape) -> None:
    check_backend("xformers", torch.device("cuda"))
    q, k, v = _qkv(shape, dtype=torch.float16, device=torch.device("cuda"))
    with use_attention("xformers"):
        out = attention(q, k, v)
    assert (out.float() - naive_attention(q, k, v).float()).abs().max().item() <= 2e-3

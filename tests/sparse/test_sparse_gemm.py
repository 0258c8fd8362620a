"""The C++ sparse GEMM kernels (kiln._C.sparse_linear / sparse_gemm_t) against dense torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln import _C
from kiln.ir import sparse as S

pytestmark = pytest.mark.skipif(not _C.sparse_gemm_supported(), reason="sparse GEMM needs AVX-512")

LAYOUTS = [S.CSR, S.bsr(4, 4), S.bsr(8, 1), S.bsr(2, 8), S.bsr(16, 1), S.bsr(1, 4)]
ACTS = [(0, lambda t: t), (1, torch.relu), (2, F.gelu), (3, lambda t: F.gelu(t, approximate="tanh")),
        (4, torch.tanh), (5, torch.sigmoid), (6, F.silu)]


def _sparse(n, k, sparsity, gen):
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < sparsity] = 0
    return w


def _run_linear(x, w, layout, bias=None, res=None, act=0, threads=1):
    e = S.encode(w, layout)
    bh, bw = S.block_of(layout)
    y = torch.full((x.shape[0], w.shape[0]), float("nan"))
    _C.sparse_linear(x.numpy(), e.values.reshape(-1).numpy(), e.indices.numpy(), e.indptr.numpy(), w.shape[0], bh, bw,
                     None if bias is None else bias.numpy(), None if res is None else res.numpy(), act, y.numpy(),
                     threads)
    return y


def _close(y, ref, rel=2e-5):
    err = (y - ref).abs().max().item() if y.numel() else 0.0
    assert err <= rel * max(1.0, ref.abs().max().item() if ref.numel() else 0.0) * 10, err


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n,k,sparsity", [(1, 7, 5, 0.5), (37, 29, 53, 0.7), (130, 64, 96, 0.9),
                                             (17, 33, 70, 0.0), (20, 24, 40, 1.0)])
def test_linear_matches_dense(layout, threads, m, n, k, sparsity):
    g = torch.Generator().manual_seed(m * n + k)
    w = _sparse(n, k, sparsity, g)
    x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    _close(_run_linear(x, w, layout, b, threads=threads), F.linear(x, w, b))
    _close(_run_linear(x, w, layout, threads=threads), F.linear(x, w))


@pytest.mark.parametrize("act,fn", ACTS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_epilogue(act, fn, with_residual):
    g = torch.Generator().manual_seed(act)
    w = _sparse(45, 64, 0.6, g)
    x, b, r = torch.randn(19, 64, generator=g), torch.randn(45, generator=g), torch.randn(19, 45, generator=g)
    res = r if with_residual else None
    ref = fn(F.linear(x, w, b) + (r if with_residual else 0))
    _close(_run_linear(x, w, S.bsr(4, 4), b, res, act, threads=2), ref)


def test_empty_rows_and_blocks():
    """Whole block rows and block columns pruned (channel-pruned layers)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 48, generator=g)
    w[4:12] = 0  # two empty block rows
    w[:, 16:32] = 0  # empty block columns
    w[20] = 0  # a partly empty block row
    x = torch.randn(21, 48, generator=g)
    b = torch.randn(32, generator=g)
    for layout in (S.CSR, S.bsr(4, 4), S.bsr(8, 1)):
        y = _run_linear(x, w, layout, b)
        _close(y, F.linear(x, w, b))
        assert torch.equal(y[:, 4:12], b[4:12].expand(21, 8))  # empty rows yield their bias exactly


def test_long_k_accumulates_over_chunks():
    """K long enough that the kernel splits it into several L2-sized chunks."""
    g = torch.Generator().manual_seed(2)
    w = _sparse(16, 9000, 0.9, g)
    x = torch.randn(70, 9000, generator=g)
    for layout in (S.CSR, S.bsr(4, 4)):
        _close(_run_linear(x, w, layout, threads=2), F.linear(x, w), rel=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_batched_form(threads):
    g = torch.Generator().manual_seed(3)
    w = _sparse(30, 27, 0.5, g)
    e = S.encode(w, S.bsr(2, 8))
    xT = torch.randn(3, 27, 50, generator=g)
    res = torch.randn(3, 30, 50, generator=g)
    b = torch.randn(30, generator=g)
    yT = torch.empty(3, 30, 50)
    _C.sparse_gemm_t(xT.numpy(), e.values.reshape(-1).numpy(), e.indices.numpy(), e.indptr.numpy(), 30, 2, 8,
                     b.numpy(), res.numpy(), 1, yT.numpy(), threads)
    _close(yT, torch.relu(w @ xT + b[:, None] + res))


def test_bad_arguments_raise():
    w = _sparse(8, 8, 0.5, torch.Generator().manual_seed(4))
    e = S.encode(w, S.CSR)
    x, y = torch.randn(3, 8), torch.empty(3, 8)
    v, c, p = e.values.numpy(), e.indices.numpy(), e.indptr.numpy()
    bad_col = c.copy()
    bad_col[0] = 99
    with pytest.raises(ValueError, match="out of range"):
        _C.sparse_linear(x.numpy(), v, bad_col, p, 8, 1, 1, None, None, 0, y.numpy(), 1)
    bad_ptr = p.copy()
    bad_ptr[1] = bad_ptr[-1] + 1
    with pytest.raises(ValueError):
        _C.sparse_linear(x.numpy(), v, c, bad_ptr, 8, 1, 1, None, None, 0, y.numpy(), 1)
    with pytest.raises(ValueError, match="block height"):
        _C.sparse_linear(x.numpy(), v, c, p, 8, 3, 1, None, None, 0, y.numpy(), 1)
    with pytest.raises(TypeError):
        _C.sparse_linear(x.numpy(), v, c, p, 8, 1, 1, torch.zeros(8, dtype=torch.float64).numpy(), None, 0,
                         y.numpy(), 1)
    with pytest.raises(ValueError, match="y"):
        _C.sparse_linear(x.numpy(), v, c, p, 8, 1, 1, None, None, 0, torch.empty(3, 9).numpy(), 1)


@pytest.mark.parametrize("layout", [S.CSR, S.bsr(4, 4), S.SPARSE_24], ids=repr)
def test_encodings_round_trip_exactly(layout):
    from kiln.pruning import weight_mask

    g = torch.Generator().manual_seed(5)
    for n, k in [(7, 12), (33, 64), (1, 4)]:
        w = torch.randn(n, k, generator=g)
        w = w * weight_mask(w, 0.5, "2:4") if layout == S.SPARSE_24 else _sparse(n, k, 0.6, g)
        e = S.encode(w, layout)
        assert torch.equal(S.densify(layout, (n, k), e.values, e.indices, e.indptr), w)
    with pytest.raises(ValueError):
        S.encode(torch.ones(4, 8), S.SPARSE_24)

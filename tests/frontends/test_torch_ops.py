"""Differential op testing through the torch frontend: each ATen op Kiln converts, over
float32 / float16 / bfloat16 / int64 where the op allows, compiled end to end with
``kiln.compile`` and compared with eager — plus edge cases: empty dims, size-1
broadcasting, non-contiguous inputs, NaN/Inf and very large values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kiln

F32, F16, BF16, I64 = torch.float32, torch.float16, torch.bfloat16, torch.int64
FLOATS = (F32, F16, BF16)
ALL = FLOATS + (I64,)
TOL = {F32: 1e-5, F16: 2e-3, BF16: 2e-2}

# (name, function, input shapes, dtypes, input kind)
OPS = [
    ("add_alpha", lambda a, b: torch.add(a, b, alpha=2), [(3, 4), (3, 4)], ALL, "any"),
    ("sub_scalar", lambda a: a - 3, [(3, 4)], ALL, "any"),
    ("rsub", lambda a: 1 - a, [(3, 4)], ALL, "any"),
    ("mul_bcast", lambda a, b: a * b, [(3, 4), (1, 4)], ALL, "any"),
    ("div", lambda a, b: a / b, [(3, 4), (3, 4)], FLOATS, "nonzero"),
    ("div_floor", lambda a, b: torch.div(a, b, rounding_mode="floor"), [(3, 4), (3, 4)], (F32, I64), "nonzero"),
    ("div_trunc", lambda a, b: torch.div(a, b, rounding_mode="trunc"), [(3, 4), (3, 4)], (F32, I64), "nonzero"),
    ("floor_divide", lambda a, b: a // b, [(3, 4), (3, 4)], (I64,), "nonzero"),
    ("pow_scalar", lambda a: a ** 2, [(3, 4)], ALL, "any"),
    ("maximum", torch.maximum, [(3, 4), (3, 4)], ALL, "any"),
    ("where", lambda a, b: torch.where(a > 0, a, b), [(3, 4), (3, 4)], ALL, "any"),
    ("masked_fill", lambda a: a.masked_fill(a < 0, -1), [(3, 4)], ALL, "any"),
    ("clamp", lambda a: a.clamp(-1, 1), [(3, 4)], ALL, "any"),
    ("relu", torch.relu, [(3, 4)], ALL, "any"),
    ("gelu", F.gelu, [(3, 4)], FLOATS, "any"),
    ("gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), [(3, 4)], FLOATS, "any"),
    ("silu", F.silu, [(3, 4)], FLOATS, "any"),
    ("sigmoid_tanh_exp", lambda a: torch.sigmoid(a) + torch.tanh(a) + torch.exp(a), [(3, 4)], FLOATS, "any"),
    ("log_sqrt_rsqrt", lambda a: torch.log(a) + torch.sqrt(a) + torch.rsqrt(a), [(3, 4)], FLOATS, "positive"),
    ("hardtanh", F.hardtanh, [(3, 4)], FLOATS, "any"),
    ("leaky_relu", lambda a: F.leaky_relu(a, 0.1), [(3, 4)], FLOATS, "any"),
    ("cast", lambda a: a.to(torch.float32) * 2, [(3, 4)], ALL, "any"),
    ("sum_mean", lambda a: a.sum(-1) + a.float().mean(0).sum(), [(3, 4)], ALL, "any"),
    ("amax_argmax", lambda a: a.amax(1, keepdim=True).float() + a.argmax(1, keepdim=True).float(), [(3, 4)], ALL,
     "any"),
    ("softmax", lambda a: torch.softmax(a, -1), [(3, 4)], FLOATS, "any"),
    ("log_softmax", lambda a: torch.log_softmax(a, 0), [(3, 4)], FLOATS, "any"),
    ("layer_norm", lambda a: F.layer_norm(a, (4,)), [(3, 4)], FLOATS, "any"),
    ("matmul", torch.matmul, [(2, 3, 4), (4, 5)], FLOATS, "any"),
    ("bmm", torch.bmm, [(2, 3, 4), (2, 4, 5)], FLOATS, "any"),
    ("linear", lambda a, w: F.linear(a, w), [(3, 4), (5, 4)], FLOATS, "any"),
    ("conv2d", lambda a, w: F.conv2d(a, w, padding=1), [(1, 2, 5, 5), (3, 2, 3, 3)], FLOATS, "any"),
    ("pools", lambda a: F.max_pool2d(a, 2) + F.avg_pool2d(a, 2), [(1, 2, 4, 4)], FLOATS, "any"),
    ("views", lambda a: a.view(2, 6).t().reshape(3, 4).unsqueeze(0).squeeze(0).flatten(), [(3, 4)], ALL, "any"),
    ("permute_transpose", lambda a: a.permute(2, 0, 1).transpose(1, 2).contiguous(), [(2, 3, 4)], ALL, "any"),
    ("expand", lambda a: a.expand(3, 2, 4) + 0, [(2, 1)], ALL, "any"),
    ("cat_stack", lambda a, b: torch.cat([a, b], 1).sum() + torch.stack([a, b]).sum(), [(3, 4), (3, 4)], ALL,
     "any"),
    ("slice_select", lambda a: a[1:, ::2] + a[0, 1:3], [(3, 4)], ALL, "any"),
    ("split_chunk", lambda a: sum(t.sum() for t in a.split(3, 1)) + a.chunk(2, 0)[1].sum(), [(4, 7)], ALL, "any"),
    ("embedding", lambda w, i: F.embedding(i, w), [(10, 4), (2, 3)], FLOATS, "index10"),
    ("index_select_gather", lambda a, i: a.index_select(1, i[0]) + a.gather(1, i), [(2, 5), (2, 5)], ALL,
     "index5"),
    ("pad", lambda a: F.pad(a, (1, 2, 0, 1), value=0.5), [(2, 3)], FLOATS, "any"),
    ("pad_reflect", lambda a: F.pad(a, (1, 1, 2, 0), mode="reflect"), [(1, 2, 4, 4)], (F32,), "any"),
    ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [(1, 2, 4, 8)] * 3, FLOATS, "any"),
    ("sdpa_causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [(1, 2, 4, 8)] * 3,
     (F32,), "any"),
    # grouped-query attention: 6 query heads share 2 key/value heads (Qwen2, Mistral under torch.compile)
    ("sdpa_gqa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
     [(1, 6, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)], FLOATS, "any"),
]


def _make(shape, dtype, kind, i):
    if kind.startswith("index") and i == 1:
        return torch.randint(0, int(kind[5:]), shape)
    if dtype == I64:
        t = torch.randint(-5, 6, shape)
        return t.masked_fill(t == 0, 1) if kind == "nonzero" else (t.abs() + 1 if kind == "positive" else t)
    t = torch.randn(shape)
    if kind == "positive":
        t = t.abs() + 0.1
    if kind == "nonzero":
        t = t.sign() * (t.abs() + 0.5)
    return t.to(dtype)


def _compare(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.dtype, got.shape, want.dtype, want.shape)
    if got.is_floating_point():
        tol = TOL.get(dtype, 1e-5) if dtype in TOL else 1e-5
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)
    else:
        assert torch.equal(got, want)


def _params():
    for name, fn, shapes, dtypes, kind in OPS:
        for dt in dtypes:
            yield pytest.param(fn, shapes, dt, kind, id=f"{name}-{str(dt)[6:]}")


@pytest.mark.parametrize("fn,shapes,dtype,kind", _params())
def test_op_matches_eager(fn, shapes, dtype, kind):
    xs = [_make(s, dtype, kind, i) for i, s in enumerate(shapes)]
    with torch.no_grad():
        want = fn(*xs)
    fast = kiln.compile(fn, xs)
    _compare(fast(*xs), want, dtype)
    assert not fast.report.fallbacks, fast.report.fallbacks


EDGE_OPS = ["add_alpha", "mul_bcast", "div", "maximum", "where", "relu", "gelu", "sigmoid_tanh_exp", "sum_mean",
            "softmax", "layer_norm", "matmul", "linear", "views", "permute_transpose", "cat_stack", "slice_select"]


def _edge(name, edge):
    fn, shapes, kind = next((f, s, k) for n, f, s, _, k in OPS if n == name)
    xs = [_make(s, F32, kind, i) for i, s in enumerate(shapes)]
    if edge == "nan_inf":
        for x in xs:
            x.view(-1)[0] = float("nan")
            x.view(-1)[-1] = float("inf")
    elif edge == "large":
        xs = [x * 1e30 for x in xs]
    elif edge == "noncontiguous":
        xs = [x.t().contiguous().t() if x.dim() == 2 else x.transpose(-1, -2).contiguous().transpose(-1, -2)
              for x in xs]
        assert not all(x.is_contiguous() for x in xs)
    return fn, xs


@pytest.mark.parametrize("edge", ["nan_inf", "large", "noncontiguous"])
@pytest.mark.parametrize("name", EDGE_OPS)
def test_edge_values(name, edge):
    if name == "views" and edge == "noncontiguous":
        pytest.skip("Tensor.view itself rejects non-contiguous inputs in eager")
    fn, xs = _edge(name, edge)
    with torch.no_grad():
        want = fn(*xs)
    _compare(kiln.compile(fn, xs)(*xs), want, F32)


@pytest.mark.parametrize("fn,shapes", [
    (lambda a, b: a + b, [(0, 4), (1, 4)]),
    (lambda a: a.sum(0), [(0, 3)]),
    (lambda a: torch.relu(a).reshape(-1, 2), [(2, 0, 4)]),
    (lambda a, w: F.linear(a, w), [(0, 4), (5, 4)]),
    (lambda a, b: torch.cat([a, b]), [(0, 3), (2, 3)]),
], ids=["add_bcast", "sum_empty", "reshape", "linear", "cat"])
def test_empty_dims(fn, shapes):
    xs = [torch.randn(s) for s in shapes]
    with torch.no_grad():
        want = fn(*xs)
    _compare(kiln.compile(fn, xs)(*xs), want, F32)


def test_dropout_is_an_identity_only_outside_training():
    """Eval-mode dropout (or p = 0) is an identity; training-mode dropout draws random numbers,
    so it runs as torch's op (a named fallback), never silently dropped."""
    x = torch.randn(64, 64) + 3.0
    ident = kiln.compile(lambda a: F.dropout(a, 0.5, training=False) * 2, [x])
    torch.testing.assert_close(ident(x), x * 2)
    assert not ident.report.fallbacks
    train = kiln.compile(lambda a: F.dropout(a, 0.5, training=True), [x])
    assert [op for op, _, _ in train.report.fallbacks] and all("dropout" in op for op, _, _ in train.report.fallbacks)
    y = train(x)
    kept = y != 0
    assert 0.3 < float(kept.float().mean()) < 0.7  # about half the elements dropped (4096 draws)
    torch.testing.assert_close(y[kept], x[kept] * 2)  # the rest scaled by 1 / (1 - p)

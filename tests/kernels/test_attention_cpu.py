"""The C++ fused attention (kiln._C.attention via kernels/attention_cpu.py) against a float64
softmax(q k^T * scale + mask) v, and against torch's sdpa where their conventions meet."""
import math

import pytest
import torch
import torch.nn.functional as F

from kiln import _C
from kiln.ir import DType, GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.kernels.nhwc import native_array as _array
from kiln.kernels.registry import candidates

pytestmark = pytest.mark.skipif(not _C.attention_supported(), reason="built without AVX-512")


def _reference(q, k, v, mask=None, causal=False, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s + (torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
                 if mask.dtype == torch.bool else mask.double())
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(s, -1) @ v


def _kernel(q, k, v, mask=None, causal=False, scale=None, threads=1):
    """Through the registered kernel, so the mask handling (bool, bf16, broadcast) is tested too."""
    b = GraphBuilder()
    dt = DType.BFLOAT16 if q.dtype == torch.bfloat16 else DType.FLOAT32
    ins = [b.input(n, t.shape, dt) for n, t in zip("qkv", (q, k, v))]
    if mask is not None:
        ins.append(b.input("mask", mask.shape, {torch.bool: DType.BOOL, torch.bfloat16: DType.BFLOAT16}.get(
            mask.dtype, DType.FLOAT32)))
    y = b.add(OpKind.ATTENTION, *ins, attrs=A.AttentionAttrs(scale, causal))
    node = next(n for n in b.build((y,)).nodes if n.op is OpKind.ATTENTION)
    kern = next(k for k in candidates(node, "cpu") if k.name == "cpu.fused_attention")
    fn = kern.bind(node, [None] * len(ins))
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn([q, k, v] + ([mask] if mask is not None else []), node.attrs)
    finally:
        torch.set_num_threads(prev)


CASES = [  # B, H, Sq, Sk, D, causal, mask shape (None: no mask)
    (1, 12, 128, 128, 64, False, (1, 1, 1, 128)),
    (2, 3, 37, 53, 40, False, (2, 1, 1, 53)),
    (2, 3, 37, 53, 40, False, (2, 3, 37, 53)),
    (1, 2, 70, 70, 80, True, None),
    (1, 1, 5, 300, 16, False, (5, 300)),
    (2, 2, 1, 9, 7, False, (1, 9)),
    (1, 4, 600, 600, 32, False, None),  # rows split across tasks (score block bound)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(dtype, case):
    B, H, Sq, Sk, D, causal, mshape = case
    g = torch.Generator().manual_seed(Sq * 31 + D)
    q, k, v = (torch.randn(B, H, s, D, generator=g).to(dtype) for s in (Sq, Sk, Sk))
    mask = (3 * torch.randn(mshape, generator=g)).to(dtype) if mshape else None
    ref = _reference(q, k, v, mask, causal)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    err_sdpa = float((sdpa.double() - ref).abs().max())
    for threads in (1, 2):
        o = _kernel(q, k, v, mask, causal, threads=threads)
        assert o.dtype == dtype and o.shape == (B, H, Sq, D)
        err = float((o.double() - ref).abs().max())
        # fp32: float32 rounding of 2 * Sk * D-term sums; bf16: the output's own rounding
        # (computed in fp32, so no worse than sdpa's bf16 path)
        assert err <= (2e-5 if dtype == torch.float32 else max(8e-3, 1.01 * err_sdpa)), (err, err_sdpa, threads)


def _direct(q, k, v, mask=None, causal=False, path="auto", threads=1):
    """Straight through the binding, choosing the bf16 path (AMX tiles or fp32 FMAs)."""
    B, H, Sq, D = q.shape
    o = torch.empty(B, Sq, H, D, dtype=q.dtype).transpose(1, 2)
    m = None if mask is None else mask.float().expand(B, H, Sq, k.shape[2]).numpy()
    _C.attention(_array(q), _array(k), _array(v), _array(o), m, 1 / math.sqrt(D), causal, threads, path)
    return o


_PAIR_PATHS = [pytest.param("amx", marks=pytest.mark.skipif(not _C.amx_bf16_supported(), reason="no AMX-BF16")),
               pytest.param("dot", marks=pytest.mark.skipif(not _C.dot_bf16_supported(), reason="no AVX512-BF16"))]


@pytest.mark.parametrize("path", _PAIR_PATHS)
@pytest.mark.parametrize("case", CASES)
def test_bf16_pair_products_match_the_fma_path_and_float64(case, path):
    """bf16 products with fp32 sums, on AMX tiles or as AVX512-BF16 dot products in registers."""
    B, H, Sq, Sk, D, causal, mshape = case
    g = torch.Generator().manual_seed(Sk * 7 + D)
    q, k, v = (torch.randn(B, H, s, D, generator=g).bfloat16() for s in (Sq, Sk, Sk))
    mask = 3 * torch.randn(mshape, generator=g) if mshape else None
    ref = _reference(q, k, v, mask, causal)
    for threads in (1, 2):
        pairs, fma = (_direct(q, k, v, mask, causal, p, threads) for p in (path, "fma"))
        # P is rounded to bf16 for the second product (as in torch's bf16 sdpa), then the
        # output: within two bf16 steps (2^-7 relative each) of the largest output
        top = max(1.0, float(ref.abs().max()))
        assert float((pairs.double() - ref).abs().max()) <= 2 ** -6 * top
        assert float((pairs.double() - fma.double()).abs().max()) <= 2 ** -6 * top
    if not _C.amx_bf16_supported():  # what the kernel runs for bf16 where there is no AMX
        assert torch.equal(_direct(q, k, v, mask, causal, "auto"), _direct(q, k, v, mask, causal, "dot"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_score_ranges_flush_negligible_terms_not_accuracy(dtype):
    # scores spanning hundreds: most exp() terms would be fp32 denormals; they are dropped
    # (under 1.8e-35 of the row's largest), and the result is still the softmax's
    g = torch.Generator().manual_seed(3)
    q, k, v = (10 * torch.randn(1, 4, 64, 64, generator=g)).to(dtype), torch.randn(1, 4, 64, 64, generator=g).to(dtype), \
        torch.randn(1, 4, 64, 64, generator=g).to(dtype)
    ref = _reference(q, k, v)
    for path in ("auto", "fma"):
        err = float((_direct(q, k, v, path=path).double() - ref).abs().max())
        assert err <= (2e-5 if dtype == torch.float32 else 1.5e-2), (path, err)


def test_strided_views_of_one_qkv_projection_and_merged_output_layout():
    B, S, H, D = 2, 50, 4, 24
    qkv = torch.randn(B, S, 3 * H * D)
    q, k, v = (qkv[:, :, i * H * D:(i + 1) * H * D].view(B, S, H, D).transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    o = _kernel(q, k, v, torch.zeros(B, 1, 1, S), scale=0.3)
    assert torch.allclose(o.double(), _reference(q, k, v, scale=0.3), atol=2e-6)
    assert o.transpose(1, 2).is_contiguous()  # [B, S, H, D] memory: the head merge is a view
    # a D dimension that is not unit-stride is copied, not misread
    qt = q.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    assert torch.allclose(_kernel(qt, k, v), _kernel(q, k, v), atol=1e-6)


def test_a_mask_strided_along_the_keys_is_read_right():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mask = torch.randn(1, 2, 7, 5).transpose(-1, -2)  # [1, 2, 5, 7] with key stride 5
    assert mask.stride(-1) not in (0, 1)
    assert torch.allclose(_kernel(q, k, v, mask).double(), _reference(q, k, v, mask), atol=2e-6)


def test_bool_mask_fully_masked_rows_and_nan():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    keep = torch.ones(1, 2, 4, 6, dtype=torch.bool)
    keep[0, 1, 2] = False  # a row that sees no key is 0, as in torch's sdpa
    keep[0, 0, 1, :3] = False
    o = _kernel(q, k, v, keep)
    assert torch.equal(o[0, 1, 2], torch.zeros(8))
    assert torch.allclose(o, F.scaled_dot_product_attention(q, k, v, attn_mask=keep), atol=1e-6)
    q[0, 0, 3, 2] = float("nan")  # a NaN query poisons its own row only
    o = _kernel(q, k, v)
    assert torch.isnan(o[0, 0, 3]).all() and not torch.isnan(o[0, 0, :3]).any() and not torch.isnan(o[0, 1]).any()


def test_bad_arguments_are_rejected():
    q = torch.randn(1, 2, 4, 8)
    o = torch.empty(1, 2, 4, 8)
    args = lambda **kw: {**dict(q=q.numpy(), k=q.numpy(), v=q.numpy(), o=o.numpy(), mask=None, scale=1.0), **kw}
    with pytest.raises(ValueError):  # dtypes differ
        _C.attention(**args(k=_array(q.bfloat16())))
    with pytest.raises((TypeError, ValueError)):
        _C.attention(**args(q=q.double().numpy()))
    with pytest.raises(ValueError):  # D not unit-stride
        _C.attention(**args(q=q.transpose(-1, -2).contiguous().transpose(-1, -2).numpy()))
    with pytest.raises(ValueError):  # shapes disagree
        _C.attention(**args(o=torch.empty(1, 2, 5, 8).numpy()))
    with pytest.raises(ValueError):
        _C.attention(**args(mask=torch.zeros(1, 2, 4, 7).numpy()))
    with pytest.raises(ValueError):
        _C.attention(**args(threads=0))
    with pytest.raises(ValueError):
        _C.attention(**args(path="tiles"))
    with pytest.raises(ValueError):  # the AMX path is bf16 only
        _C.attention(**args(path="amx"))
    with pytest.raises(ValueError):  # so is the AVX512-BF16 one
        _C.attention(**args(path="dot"))


def test_candidate_only_for_supported_nodes():
    def names(q_shape, k_shape, dtype=DType.FLOAT32, mask_shape=None):
        b = GraphBuilder()
        ins = [b.input("q", q_shape, dtype), b.input("k", k_shape, dtype), b.input("v", k_shape, dtype)]
        if mask_shape:
            ins.append(b.input("m", mask_shape))
        y = b.add(OpKind.ATTENTION, *ins, attrs=A.AttentionAttrs())
        node = next(n for n in b.build((y,)).nodes if n.op is OpKind.ATTENTION)
        return [k.name for k in candidates(node, "cpu")]

    assert "cpu.fused_attention" in names((1, 12, 128, 64), (1, 12, 128, 64), mask_shape=(1, 1, 1, 128))
    assert "cpu.fused_attention" in names((1, 2, 8, 64), (1, 2, 9, 64), DType.BFLOAT16)
    assert "cpu.fused_attention" not in names((1, 2, 8, 64), (1, 2, 9, 64), DType.FLOAT16)
    assert "cpu.fused_attention" not in names((2, 8, 64), (2, 9, 64))


@pytest.mark.parametrize("path", _PAIR_PATHS)
def test_bf16_pair_products_fully_masked_rows_and_nan(path):
    """The bf16 pair paths keep the conventions: a row that sees no key is 0, a NaN query
    poisons its own row only, causal rows see only earlier keys."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 40, generator=g).bfloat16() for n in (20, 33, 33))
    keep = torch.ones(1, 2, 20, 33, dtype=torch.bool)
    keep[0, 1, 2] = False
    mask = torch.zeros(keep.shape).masked_fill_(~keep, -math.inf)
    o = _direct(q, k, v, mask, path=path)
    assert torch.equal(o[0, 1, 2].float(), torch.zeros(40))
    ref = _reference(q, k, v, keep)
    ref[0, 1, 2] = 0  # (the float64 softmax of a row of -inf is NaN)
    assert float((o.double() - ref).abs().max()) <= 2 ** -6 * 2
    q[0, 0, 3, 5] = float("nan")
    o = _direct(q, k, v, path=path)
    assert torch.isnan(o[0, 0, 3]).all() and not torch.isnan(o[0, 0, :3]).any() and not torch.isnan(o[0, 1]).any()
    o = _direct(q[:, :, :7], k[:, :, :7], v[:, :, :7], causal=True, path=path)
    assert float((o[0, 1].double() - _reference(q[:, :, :7], k[:, :, :7], v[:, :, :7], causal=True)[0, 1]).abs().max()) \
        <= 2 ** -6 * 2

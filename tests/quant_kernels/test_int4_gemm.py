"""The int4 weight-only GEMM (kiln._C.linear_int4) against its torch reference."""
import pytest
import torch
from conftest import max_err_ok
from kiln.kernels import int8_cpu as q

pytestmark = pytest.mark.skipif(not q.capabilities()["int4"], reason="needs AVX-512")


def test_pack_unpack_roundtrip_follows_the_format():
    vals = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = q.pack_int4(vals)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == (int(vals[0, 0]) & 0xF) | ((int(vals[0, 1]) & 0xF) << 4)
    assert torch.equal(q.unpack_int4(packed), vals)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_int4_matches_reference(group, threads):
    # rows: decode (1), the register path's tails (3, 5), the buffered path (16, 37);
    # K = 640 crosses the 256-k dequantization chunks with a partial last one
    for m, n, k in [(1, 40, 640), (3, 17, 128), (5, 70, 256), (16, 33, 640), (37, 80, 384)]:
        if k % group:
            continue
        w_packed, scales = q.quantize_weight_int4(torch.randn(n, k), group)
        bias = torch.randn(n)
        x = torch.randn(m, k)
        packed = q.prepack_int4(w_packed, scales)
        assert packed.group == group
        got = q.linear_int4(x, packed, bias, "gelu", threads=threads)
        want = q.ref_linear_int4(x, w_packed, scales, bias, "gelu")
        ok, err, tol = max_err_ok(got, want, rel=1e-5)
        assert ok, (m, n, k, err, tol)


@pytest.mark.parametrize("activation", q.ACTIVATIONS)
def test_linear_int4_activations_and_leading_dims(activation):
    w_packed, scales = q.quantize_weight_int4(torch.randn(24, 64), 32)
    x = torch.randn(2, 9, 64)
    got = q.linear_int4(x, q.prepack_int4(w_packed, scales), None, activation)
    assert got.shape == (2, 9, 24)
    assert max_err_ok(got, q.ref_linear_int4(x, w_packed, scales, None, activation), rel=1e-5)[0]


def test_linear_int4_argument_errors():
    w_packed, scales = q.quantize_weight_int4(torch.randn(8, 64), 32)
    packed = q.prepack_int4(w_packed, scales)
    with pytest.raises(ValueError, match="group"):
        q.prepack_int4(w_packed, scales, group_size=16)
    with pytest.raises(ValueError, match="multiple of the group"):
        q.prepack_int4(w_packed[:, :24], scales[:, :1], group_size=32)
    with pytest.raises(ValueError, match="scales"):
        q.prepack_int4(w_packed, scales[:, :1], group_size=32)
    with pytest.raises(TypeError, match="dtype"):
        q.prepack_int4(w_packed.to(torch.int8), scales)
    with pytest.raises(ValueError, match=r"x: expected shape \(M, 64\)"):
        q.linear_int4(torch.randn(3, 32), packed)
    with pytest.raises(ValueError, match="activation"):
        q.linear_int4(torch.randn(3, 64), packed, activation="elu")


def test_linear_int4_into_preallocated_output():
    w_packed, scales = q.quantize_weight_int4(torch.randn(20, 128), 64)
    x = torch.randn(3, 128)
    out = torch.empty(3, 20)
    assert q.linear_int4(x, q.prepack_int4(w_packed, scales), out=out) is out
    assert max_err_ok(out, q.ref_linear_int4(x, w_packed, scales), rel=1e-5)[0]

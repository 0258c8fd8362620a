"""The int4 weight-only GEMM (kiln._C.linear_int4) against its torch reference."""
import pytest
import torch
from conftest import max_err_ok
from kiln.ir import qformat
from kiln.kernels import int8_cpu

pytestmark = pytest.mark.skipif(not int8_cpu.capabilities()["int4"], reason="needs AVX-512")


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_int4_matches_reference(group, threads):
    # rows: decode (1), the register path's tails (3, 5), the buffered path (16, 37);
    # K = 640 crosses the 256-k dequantization chunks with a partial last one
    for m, n, k in [(1, 40, 640), (3, 17, 128), (5, 70, 256), (16, 33, 640), (37, 80, 384)]:
        if k % group:
            continue
        w_packed, scales = qformat.quantize_weight_int4(torch.randn(n, k), group)
        bias = torch.randn(n)
        x = torch.randn(m, k)
        packed = int8_cpu.prepack_int4(w_packed, scales)
        assert packed.group == group
        got = int8_cpu.linear_int4(x, packed, bias, "gelu", threads=threads)
        want = int8_cpu.ref_linear_int4(x, w_packed, scales, bias, "gelu")
        ok, err, tol = max_err_ok(got, want, rel=1e-5)
        assert ok, (m, n, k, err, tol)


@pytest.mark.parametrize("activation", int8_cpu.ACTIVATIONS)
def test_linear_int4_activations_and_leading_dims(activation):
    w_packed, scales = qformat.quantize_weight_int4(torch.randn(24, 64), 32)
    x = torch.randn(2, 9, 64)
    got = int8_cpu.linear_int4(x, int8_cpu.prepack_int4(w_packed, scales), None, activation)
    assert got.shape == (2, 9, 24)
    assert max_err_ok(got, int8_cpu.ref_linear_int4(x, w_packed, scales, None, activation), rel=1e-5)[0]


def test_linear_int4_argument_errors():
    w_packed, scales = qformat.quantize_weight_int4(torch.randn(8, 64), 32)
    packed = int8_cpu.prepack_int4(w_packed, scales)
    with pytest.raises(ValueError, match="group"):
        int8_cpu.prepack_int4(w_packed, scales, group_size=16)
    with pytest.raises(ValueError, match="multiple of the group"):
        int8_cpu.prepack_int4(w_packed[:, :24], scales[:, :1], group_size=32)
    with pytest.raises(ValueError, match="scales"):
        int8_cpu.prepack_int4(w_packed, scales[:, :1], group_size=32)
    with pytest.raises(TypeError, match="dtype"):
        int8_cpu.prepack_int4(w_packed.to(torch.int8), scales)
    with pytest.raises(ValueError, match=r"x: expected shape \(M, 64\)"):
        int8_cpu.linear_int4(torch.randn(3, 32), packed)
    with pytest.raises(ValueError, match="activation"):
        int8_cpu.linear_int4(torch.randn(3, 64), packed, activation="elu")


def test_linear_int4_into_preallocated_output():
    w_packed, scales = qformat.quantize_weight_int4(torch.randn(20, 128), 64)
    x = torch.randn(3, 128)
    out = torch.empty(3, 20)
    assert int8_cpu.linear_int4(x, int8_cpu.prepack_int4(w_packed, scales), out=out) is out
    assert max_err_ok(out, int8_cpu.ref_linear_int4(x, w_packed, scales), rel=1e-5)[0]

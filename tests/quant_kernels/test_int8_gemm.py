"""The int8 GEMM kernels (kiln._C via kiln.kernels.int8_cpu) against their torch references:
exact int32 cores on both paths, exact dynamic quantization, fused epilogues within fp32
rounding, and argument checking."""
import pytest
import torch
from conftest import max_err_ok
from kiln.ir import qformat
from kiln.kernels import int8_cpu

CAPS = int8_cpu.capabilities()
pytestmark = pytest.mark.skipif(not CAPS["vnni"], reason="needs AVX512-VNNI")
PATHS = ["vnni"] + (["amx"] if CAPS["amx"] else [])
ODD_SHAPES = [(1, 1, 1), (1, 33, 5), (3, 17, 13), (7, 50, 129), (16, 16, 64), (33, 47, 65), (64, 80, 256),
              (100, 130, 321)]


def _weight(n, k):
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return w_q, torch.rand(n) * 0.02 + 1e-3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
def test_int32_core_exact_on_odd_shapes(path, threads):
    for m, n, k in ODD_SHAPES:
        w_q, w_scale = _weight(n, k)
        x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8)
        got = int8_cpu.int8_gemm_s32(x_q, int8_cpu.prepack_int8(w_q, w_scale), path=path, threads=threads)
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got, int8_cpu.ref_int8_gemm_s32(x_q, w_q)), (m, n, k)


@pytest.mark.parametrize("path", PATHS)
def test_int32_core_extremes_do_not_saturate(path):
    # vpdpbusd (unlike vpmaddubsw) adds 4 products into int32 without saturating
    k = 4096
    x_q = torch.full((32, k), 255, dtype=torch.uint8)
    w_q = torch.cat([torch.full((16, k), -128, dtype=torch.int8), torch.full((16, k), 127, dtype=torch.int8)])
    got = int8_cpu.int8_gemm_s32(x_q, int8_cpu.prepack_int8(w_q, torch.ones(32)), path=path, threads=2)
    assert torch.equal(got, int8_cpu.ref_int8_gemm_s32(x_q, w_q))
    assert got[0, 0].item() == 255 * -128 * k


def test_aligned_input_is_read_in_place_and_matches():
    # M a multiple of 32 and K of 64: both paths read x_q without the padded copy
    w_q, w_scale = _weight(48, 128)
    x_q = torch.randint(0, 256, (64, 128), dtype=torch.uint8)
    packed = int8_cpu.prepack_int8(w_q, w_scale)
    for path in PATHS:
        assert torch.equal(int8_cpu.int8_gemm_s32(x_q, packed, path=path), int8_cpu.ref_int8_gemm_s32(x_q, w_q))


def test_quantize_per_row_is_exact():
    x = torch.randn(9, 37) * 3
    x[1] = 0.0  # all zero: scale 1, zp 0
    x[2] = x[2].abs() + 0.5  # all positive: zp 0
    x[3] = -x[3].abs() - 0.5  # all negative: zp 255
    for threads in (1, 2):
        got = int8_cpu.quantize_per_row(x, threads=threads)
        want = int8_cpu.ref_quantize_per_row(x)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    big = torch.randn(64, 700)
    assert all(torch.equal(g, w) for g, w in zip(int8_cpu.quantize_per_row(big, 2), int8_cpu.ref_quantize_per_row(big)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", int8_cpu.ACTIVATIONS)
def test_qlinear_dynamic_matches_reference(path, activation):
    for (m, n, k), threads in [((1, 40, 33), 1), ((20, 70, 96), 2), ((37, 33, 200), 2)]:
        w = torch.randn(n, k)
        w_q, w_scale = qformat.quantize_weight_int8(w)
        bias = torch.randn(n)
        x = torch.randn(m, k)
        packed = int8_cpu.prepack_int8(w_q, w_scale)
        got = int8_cpu.qlinear_dynamic(x, packed, bias, activation, path=path, threads=threads)
        want = int8_cpu.ref_qlinear_dynamic(x, w_q, w_scale, bias, activation)
        ok, err, tol = max_err_ok(got, want, rel=1e-5)
        assert ok, (m, n, k, err, tol)


def test_qlinear_dynamic_is_close_to_fp32_and_keeps_leading_dims():
    w = torch.randn(64, 256)
    x = torch.randn(2, 24, 256)
    w_q, w_scale = qformat.quantize_weight_int8(w)
    got = int8_cpu.qlinear_dynamic(x, int8_cpu.prepack_int8(w_q, w_scale), None, "none")
    assert got.shape == (2, 24, 64)
    want = torch.nn.functional.linear(x, w)
    assert (got - want).abs().max() < 0.02 * want.abs().max()  # int8 rounding, not a bug


@pytest.mark.parametrize("path", PATHS)
def test_qlinear_static_per_tensor_and_per_row(path):
    m, n, k = 35, 52, 97
    w_q, w_scale = _weight(n, k)
    bias = torch.randn(n)
    x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8)
    packed = int8_cpu.prepack_int8(w_q, w_scale)
    for xs, xz in [(0.05, 128), (torch.rand(m) * 0.1 + 0.01, torch.randint(0, 256, (m,), dtype=torch.int32))]:
        got = int8_cpu.qlinear_static(x_q, xs, xz, packed, bias, "relu", path=path, threads=2)
        want = int8_cpu.ref_qlinear_static(x_q, xs, xz, w_q, w_scale, bias, "relu")
        assert max_err_ok(got, want, rel=1e-5)[0]


@pytest.mark.parametrize("path", PATHS)
def test_qlinear_static_requantized_u8_output(path):
    m, n, k = 19, 40, 64
    w_q, w_scale = _weight(n, k)
    x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8)
    packed = int8_cpu.prepack_int8(w_q, w_scale)
    ref_f32 = int8_cpu.ref_qlinear_static(x_q, 0.05, 100, w_q, w_scale, None, "none")
    out_scale = float(ref_f32.abs().max()) / 200  # some outputs clamp at 0 and 255
    got = int8_cpu.qlinear_static(x_q, 0.05, 100, packed, None, "none", out_scale=out_scale, out_zp=128, path=path)
    want = int8_cpu.ref_qlinear_static(x_q, 0.05, 100, w_q, w_scale, None, "none", out_scale=out_scale, out_zp=128)
    assert got.dtype == torch.uint8
    assert (got.int() - want.int()).abs().max() <= 1  # a rounding tie may fall either way
    assert (want == 0).any() and (want == 255).any()


def test_auto_path_choice():
    assert int8_cpu.int8_path(1) == "vnni"
    assert int8_cpu.int8_path(128) == ("amx" if CAPS["amx"] else "vnni")
    assert int8_cpu.int8_path(128, "vnni") == "vnni"


def test_argument_errors():
    w_q, w_scale = _weight(8, 16)
    packed = int8_cpu.prepack_int8(w_q, w_scale)
    x = torch.randn(4, 16)
    with pytest.raises(TypeError, match="dtype"):
        int8_cpu.prepack_int8(w_q.float(), w_scale)
    with pytest.raises(ValueError, match="w_scale"):
        int8_cpu.prepack_int8(w_q, torch.ones(7))
    with pytest.raises(ValueError, match=r"x: expected shape \(M, 16\)"):
        int8_cpu.qlinear_dynamic(torch.randn(4, 15), packed)
    with pytest.raises(TypeError, match="dtype"):
        int8_cpu.qlinear_dynamic(x.double(), packed)
    with pytest.raises(ValueError, match="activation"):
        int8_cpu.qlinear_dynamic(x, packed, activation="tanh")
    with pytest.raises(ValueError, match="path"):
        int8_cpu.qlinear_dynamic(x, packed, path="sse")
    with pytest.raises(ValueError, match="bias"):
        int8_cpu.qlinear_dynamic(x, packed, torch.ones(9))
    with pytest.raises(ValueError, match="threads"):
        int8_cpu.qlinear_dynamic(x, packed, threads=0)
    x_q = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="x_scale"):
        int8_cpu.qlinear_static(x_q, torch.ones(3), 0, packed)
    with pytest.raises(ValueError, match="out_zp"):
        int8_cpu.qlinear_static(x_q, 1.0, 0, packed, out_scale=1.0, out_zp=300)
    with pytest.raises(ValueError, match="out_scale"):
        int8_cpu.qlinear_static(x_q, 1.0, 0, packed, out_scale=0.0)
    with pytest.raises(ValueError, match="K must be at most"):
        int8_cpu.prepack_int8(torch.zeros(1, 65537, dtype=torch.int8), torch.ones(1))
    if not CAPS["amx"]:
        with pytest.raises(RuntimeError, match="AMX"):
            int8_cpu.int8_gemm_s32(x_q, packed, path="amx")


def test_preallocated_outputs_are_written_and_checked():
    w_q, w_scale = _weight(24, 40)
    packed = int8_cpu.prepack_int8(w_q, w_scale)
    x = torch.randn(2, 5, 40)
    out = torch.full((2, 5, 24), float("nan"))
    assert int8_cpu.qlinear_dynamic(x, packed, out=out) is out
    assert max_err_ok(out, int8_cpu.ref_qlinear_dynamic(x, w_q, w_scale), rel=1e-5)[0]
    x_q = torch.randint(0, 256, (10, 40), dtype=torch.uint8)
    s32 = torch.empty(10, 24, dtype=torch.int32)
    assert int8_cpu.int8_gemm_s32(x_q, packed, out=s32) is s32
    assert torch.equal(s32, int8_cpu.ref_int8_gemm_s32(x_q, w_q))
    u8 = torch.empty(10, 24, dtype=torch.uint8)
    assert int8_cpu.qlinear_static(x_q, 0.1, 3, packed, out_scale=0.5, out=u8) is u8
    with pytest.raises(TypeError, match="out"):
        int8_cpu.qlinear_dynamic(x, packed, out=torch.empty(2, 5, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        int8_cpu.qlinear_dynamic(x, packed, out=torch.empty(2, 5, 23))
    with pytest.raises(ValueError, match="out"):
        int8_cpu.qlinear_dynamic(x, packed, out=torch.empty(24, 10).t())  # not contiguous


@pytest.mark.parametrize("with_bias", [True, False])
def test_qlinear_dynamic_runner_is_the_checked_call(with_bias):
    # what a compiled plan calls: the same kernel, its constant arguments converted once
    w_q, w_scale = qformat.quantize_weight_int8(torch.randn(40, 72))
    packed = int8_cpu.prepack_int8(w_q, w_scale)
    bias = torch.randn(40) if with_bias else None
    run = int8_cpu.qlinear_dynamic_runner(packed, bias)
    x = torch.randn(2, 72, 33).transpose(1, 2)  # [2, 33, 72], not contiguous
    for act in ("none", "gelu"):
        y = run(x, act)
        assert y.shape == (2, 33, 40)
        assert torch.equal(y, int8_cpu.qlinear_dynamic(x, packed, bias, act))

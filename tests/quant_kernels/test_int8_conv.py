"""int8 NHWC conv2d (im2col + the int8 GEMM) against an exact integer reference."""
import pytest
import torch
from conftest import max_err_ok
from kiln.kernels import int8_cpu

pytestmark = pytest.mark.skipif(not int8_cpu.capabilities()["vnni"], reason="needs AVX512-VNNI")

# (C, OC, kernel, stride, padding, H): ResNet-style convs at small sizes, including the
# 7x7 stem (C = 3: K = 147 = 4 * 36 + 3) and the strided 1x1 downsample
CONVS = [(3, 16, 7, 2, 3, 20), (16, 16, 3, 1, 1, 9), (16, 32, 3, 2, 1, 9), (16, 32, 1, 2, 0, 9),
         (32, 24, 1, 1, 0, 7)]


@pytest.mark.parametrize("c,oc,k,stride,pad,h", CONVS)
def test_qconv2d_nhwc_fp32_and_requantized(c, oc, k, stride, pad, h):
    x_q = torch.randint(0, 256, (2, h, h, c), dtype=torch.uint8)
    w_q = torch.randint(-127, 128, (oc, c, k, k), dtype=torch.int8)
    w_scale = torch.rand(oc) * 0.01 + 1e-3
    bias = torch.randn(oc)
    conv = int8_cpu.prepack_conv_int8(w_q, w_scale)
    kw = {"stride": stride, "padding": pad}
    got = int8_cpu.qconv2d_nhwc(x_q, 0.02, 120, conv, bias, "relu", **kw, threads=2)
    want = int8_cpu.ref_qconv2d_nhwc(x_q, 0.02, 120, w_q, w_scale, bias, "relu", **kw)
    assert got.shape == want.shape
    assert max_err_ok(got, want, rel=1e-5)[0]
    out_scale = float(want.max()) / 255
    got8 = int8_cpu.qconv2d_nhwc(x_q, 0.02, 120, conv, bias, "relu", **kw, out_scale=out_scale, out_zp=0)
    want8 = int8_cpu.ref_qconv2d_nhwc(x_q, 0.02, 120, w_q, w_scale, bias, "relu", **kw, out_scale=out_scale, out_zp=0)
    assert got8.dtype == torch.uint8 and (got8.int() - want8.int()).abs().max() <= 1


def test_qconv2d_nhwc_argument_errors():
    conv = int8_cpu.prepack_conv_int8(torch.zeros(4, 3, 3, 3, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="x_q"):
        int8_cpu.qconv2d_nhwc(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 1.0, 0, conv)  # NCHW by mistake
    with pytest.raises(TypeError, match="uint8"):
        int8_cpu.qconv2d_nhwc(torch.zeros(1, 8, 8, 3), 1.0, 0, conv)
    with pytest.raises(ValueError, match="OC, C, KH, KW"):
        int8_cpu.prepack_conv_int8(torch.zeros(4, 27, dtype=torch.int8), torch.ones(4))

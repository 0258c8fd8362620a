"""The C++ NHWC max-pool (kiln._C.max_pool2d_nhwc via kernels/pool_cpu.py) against torch."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from kiln import _C
from kiln.ir import DType, GraphBuilder, Layout, LayoutKind, OpKind
from kiln.ir import attrs as A
from kiln.kernels.nhwc import nhwc_array as _nhwc
from kiln.kernels.registry import candidates

pytestmark = pytest.mark.skipif(not _C.max_pool_supported(), reason="built without AVX-512")


def _pool(x, kernel, stride, padding, dilation, ceil_mode, threads=1):
    ref = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    y = torch.empty(ref.shape, dtype=x.dtype, memory_format=torch.channels_last)
    _C.max_pool2d_nhwc(_nhwc(x), _nhwc(y), kernel, stride, padding, dilation, threads)
    return y, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [3, 16, 20, 64])
def test_matches_torch_bit_for_bit(dtype, channels):
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 11, 10, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    for k, s, p, d, ceil in itertools.product((1, 2, 3), (1, 2), (0, 1), (1, 2), (False, True)):
        if p > (k // 2):
            continue  # torch requires padding <= kernel / 2
        y, ref = _pool(x, (k, k), (s, s), (p, p), (d, d), ceil)
        assert torch.equal(y, ref), (k, s, p, d, ceil)


def test_rectangular_windows_two_threads_and_nan():
    x = torch.randn(3, 32, 15, 13).contiguous(memory_format=torch.channels_last)
    x[1, 5, 4, 4] = float("nan")
    y, ref = _pool(x, (3, 2), (2, 1), (1, 0), (1, 1), False, threads=2)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y).any()
    assert torch.equal(y.nan_to_num(0), ref.nan_to_num(0))


def test_bad_arguments_are_rejected():
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    y = torch.empty(1, 8, 3, 3, memory_format=torch.channels_last)
    with pytest.raises(TypeError):
        _C.max_pool2d_nhwc(_nhwc(x).astype("float64"), _nhwc(y), (2, 2), (2, 2), (0, 0), (1, 1))
    with pytest.raises(ValueError):  # an NCHW tensor's NHWC view is not contiguous
        _C.max_pool2d_nhwc(x.contiguous().permute(0, 2, 3, 1).numpy(), _nhwc(y), (2, 2), (2, 2), (0, 0), (1, 1))
    with pytest.raises(ValueError):
        _C.max_pool2d_nhwc(_nhwc(x), _nhwc(torch.empty(1, 4, 3, 3, memory_format=torch.channels_last)),
                           (2, 2), (2, 2), (0, 0), (1, 1))
    with pytest.raises(ValueError):
        _C.max_pool2d_nhwc(_nhwc(x), _nhwc(y), (0, 2), (2, 2), (0, 0), (1, 1))


def test_is_a_candidate_for_channels_last_nodes_only():
    for layout, expect in ((LayoutKind.CHANNELS_LAST, True), (LayoutKind.ROW_MAJOR, False)):
        b = GraphBuilder()
        x = b.input("x", (1, 8, 12, 12))
        if layout is LayoutKind.CHANNELS_LAST:
            x = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(Layout(layout)))
        y = b.add(OpKind.MAX_POOL2D, x, attrs=A.Pool2dAttrs((3, 3), (2, 2), (1, 1)))
        g = b.build((y,))
        node = next(n for n in g.nodes if n.op is OpKind.MAX_POOL2D)
        names = [k.name for k in candidates(node, "cpu")]
        assert ("cpu.max_pool2d_nhwc" in names) is expect, names
        if expect:
            k = next(k for k in candidates(node, "cpu") if k.name == "cpu.max_pool2d_nhwc")
            t = torch.randn(1, 8, 12, 12).contiguous(memory_format=torch.channels_last)
            assert torch.equal(k.bind(node, [None])([t], node.attrs), F.max_pool2d(t, 3, 2, 1))


def test_a_symbolic_batch_is_served_at_any_batch():
    from kiln.ir import Sym

    b = GraphBuilder()
    x = b.add(OpKind.TO_LAYOUT, b.input("x", (Sym("batch"), 8, 12, 12)),
              attrs=A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST)))
    g = b.build((b.add(OpKind.MAX_POOL2D, x, attrs=A.Pool2dAttrs((3, 3), (2, 2), (1, 1))),))
    node = next(n for n in g.nodes if n.op is OpKind.MAX_POOL2D)
    k = next(k for k in candidates(node, "cpu") if k.name == "cpu.max_pool2d_nhwc")
    fn = k.bind(node.at_sizes({"batch": 2}), [None])
    for n in (1, 2, 5):
        t = torch.randn(n, 8, 12, 12).contiguous(memory_format=torch.channels_last)
        assert torch.equal(fn([t], node.attrs), F.max_pool2d(t, 3, 2, 1)), n


@pytest.mark.skipif(not _C.max_pool_u8_supported(), reason="built without AVX-512BW")
@pytest.mark.parametrize("channels", [3, 64, 65, 130])
@pytest.mark.parametrize("threads", [1, 2])
def test_uint8_matches_torch_bit_for_bit(channels, threads):
    """Quantized activations: 64 channels a vector, tails masked, padding excluded."""
    g = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 256, (2, channels, 13, 11), generator=g, dtype=torch.uint8)
    for k, s, p, d, ceil in itertools.product((2, 3), (1, 2), (0, 1), (1, 2), (False, True)):
        if p > (k // 2):
            continue
        ref = F.max_pool2d(x, (k, k), (s, s), (p, p), (d, d), ceil)  # torch's NCHW uint8 pool
        y = torch.empty(ref.shape, dtype=torch.uint8, memory_format=torch.channels_last)
        _C.max_pool2d_nhwc(_nhwc(x.contiguous(memory_format=torch.channels_last)), _nhwc(y), (k, k), (s, s),
                           (p, p), (d, d), threads)
        assert torch.equal(y, ref), (k, s, p, d, ceil)


@pytest.mark.skipif(not _C.max_pool_u8_supported(), reason="built without AVX-512BW")
def test_uint8_nodes_are_candidates_in_any_layout():
    """int8-static's stem pool: a uint8 value declared NCHW (the quantized convolution stores
    it channels-last) is pooled as it lies, and an NCHW tensor is taken too."""
    b = GraphBuilder()
    x = b.input("x", (1, 8, 12, 12))
    q = b.add(OpKind.QUANTIZE, x, attrs=A.QuantizeAttrs(0.05, 3))
    y = b.add(OpKind.MAX_POOL2D, q, attrs=A.Pool2dAttrs((3, 3), (2, 2), (1, 1)))
    g = b.build((y,))
    node = next(n for n in g.nodes if n.op is OpKind.MAX_POOL2D)
    assert node.outputs[0].type.quant == node.inputs[0].type.quant  # a pooled quantized value keeps its parameters
    k = next(k for k in candidates(node, "cpu") if k.name == "cpu.max_pool2d_nhwc")
    t = torch.randint(0, 256, (1, 8, 12, 12), dtype=torch.uint8)
    for inp in (t, t.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(k.bind(node, [None])([inp], node.attrs), F.max_pool2d(t, 3, 2, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nchw_max_pool_through_channels_last_matches_torch(dtype):
    """cpu.max_pool2d_via_nhwc: a row-major (NCHW) input pooled channels-last, returned
    row-major, bit for bit torch's NCHW max-pool."""
    b = GraphBuilder()
    x = b.input("x", (2, 16, 15, 13), {torch.float32: DType.FLOAT32, torch.bfloat16: DType.BFLOAT16}[dtype])
    attrs = A.Pool2dAttrs((3, 3), (2, 2), (1, 1), (1, 1), True)
    node = b.build((b.add(OpKind.MAX_POOL2D, x, attrs=attrs),)).nodes[0]
    k = next(k for k in candidates(node, "cpu") if k.name == "cpu.max_pool2d_via_nhwc")
    t = torch.randn(2, 16, 15, 13).to(dtype)
    t[1, 3, 4, 4] = float("nan")
    y = k.bind(node, [None])([t], attrs)
    ref = F.max_pool2d(t, 3, 2, 1, 1, True)
    assert y.is_contiguous() and torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(y.nan_to_num(0), ref.nan_to_num(0))
    cl = b.build((b.add(OpKind.MAX_POOL2D, b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST))),
                        attrs=attrs),)).nodes[-1]
    assert "cpu.max_pool2d_via_nhwc" not in [k.name for k in candidates(cl, "cpu")]  # the NHWC kernels take those

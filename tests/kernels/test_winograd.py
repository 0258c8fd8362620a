"""Winograd F(2x2,3x3) / F(4x4,3x3) convolution (kernels/winograd.py, csrc/winograd.cpp)
against a float64 direct convolution."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from kiln import _C
from kiln.ir import DType, GraphBuilder, Layout, LayoutKind, OpKind
from kiln.ir import attrs as A
from kiln.kernels import winograd
from kiln.kernels.registry import candidates, kernels_for

pytestmark = pytest.mark.skipif(not _C.winograd_supported(), reason="built without AVX-512")
RELU, NONE = A.Activation.RELU, A.Activation.NONE


def _node(x_shape, w, bias, residual, attrs, layout=LayoutKind.CHANNELS_LAST, dtype=DType.FLOAT32):
    b = GraphBuilder()
    x = b.input("x", x_shape, dtype)
    if layout is LayoutKind.CHANNELS_LAST:
        x = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(Layout(layout)))
    ins = [x, b.const(w)] + ([b.const(bias)] if bias is not None else [])
    if residual:
        if bias is None:
            ins.append(None)
        k = w.shape[0]
        oh, ow = x_shape[2] + 2 * attrs.padding[0] - 2, x_shape[3] + 2 * attrs.padding[1] - 2
        ins.append(b.input("r", (x_shape[0], k, oh, ow), dtype))
    return b.build([b.add(OpKind.CONV2D, *ins, attrs=attrs)]).nodes[-1]


def _bound(m, node, w, bias, residual):
    k = next(k for k in candidates(node, "cpu") if k.name == f"cpu.winograd{m}_conv")
    return k.bind(node, [None, w] + ([bias] if bias is not None else ([None] if residual else [])) +
                  ([None] if residual else []))


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(1, 64, 14, 14, 64), (2, 20, 9, 10, 24), (1, 3, 7, 5, 17), (1, 33, 4, 4, 16)])
@pytest.mark.parametrize("epilogue", ["none", "bias_relu", "residual_relu", "residual_only"])
def test_matches_float64_convolution(m, shape, epilogue):
    n, c, h, wd, k = shape
    g = torch.Generator().manual_seed(c * 100 + k)
    w = torch.randn(k, c, 3, 3, generator=g) * (2 / (9 * c)) ** 0.5  # He init: unit-scale outputs
    bias = torch.randn(k, generator=g) if epilogue in ("bias_relu", "residual_relu") else None
    residual = epilogue.startswith("residual")
    attrs = A.Conv2dAttrs(padding=(1, 1), activation=RELU if epilogue.endswith("relu") else NONE)
    node = _node((n, c, h, wd), w, bias, residual, attrs)
    x = torch.randn(n, c, h, wd, generator=g).contiguous(memory_format=torch.channels_last)
    r = torch.randn(n, k, h, wd, generator=g).contiguous(memory_format=torch.channels_last) if residual else None
    args = [x, w] + ([bias] if bias is not None else ([None] if residual else [])) + ([r] if residual else [])
    y = _bound(m, node, w, bias, residual)(args, attrs)
    ref = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), padding=1)
    if residual:
        ref = ref + r.double()
    if attrs.activation is RELU:
        ref = ref.relu()
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    # F(2x2) is as accurate as a direct fp32 convolution; F(4x4)'s transforms lose about 1e-5
    tol = (2e-6 if m == 2 else 2e-5) * max(1.0, ref.abs().max().item())
    assert (y.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("m", [2, 4])
def test_padding_batch_and_threads(m):
    """Padding 0 and 2, two images, two threads, a non-contiguous (NCHW) input."""
    for pad, threads in itertools.product((0, 2), (1, 2)):
        w = torch.randn(16, 8, 3, 3) * 0.2
        attrs = A.Conv2dAttrs(padding=(pad, pad))
        node = _node((2, 8, 11, 9), w, None, False, attrs)
        x = torch.randn(2, 8, 11, 9)  # NCHW: the kernel makes it channels-last
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = _bound(m, node, w, None, False)([x, w], attrs)
        finally:
            torch.set_num_threads(prev)
        ref = F.conv2d(x.double(), w.double(), padding=pad)
        assert (y.double() - ref).abs().max().item() < 1e-4, (pad, threads)


def test_weight_transform_reproduces_the_filter():
    """U = G g G^T, laid out [point, C, K]. G's first and last rows are unit vectors, so the
    first and last points of F(2x2) are the filter's corner taps."""
    w = torch.randn(5, 3, 3, 3)
    u = winograd.transform_weight(w, 2)
    assert u.shape == (16, 3, 5)
    torch.testing.assert_close(u[0], w[:, :, 0, 0].t())
    torch.testing.assert_close(u[15], w[:, :, 2, 2].t())
    assert winograd.transform_weight(w, 4).shape == (36, 3, 5)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("k", [6, 16, 37])
@pytest.mark.parametrize("layout", ["oihw", "channels_last", "strided"])
def test_weight_transform_is_the_float64_definition(m, k, layout):
    """G g G^T of every filter, computed in float64 and rounded once, for filter counts below,
    at and past a block of 16 (and on two threads: channels split between them); from a
    contiguous weight and from others (channels-last, as a plan and an artifact keep it)."""
    w = torch.randn(k, 5, 3, 3)
    g = torch.tensor(winograd._G[m], dtype=torch.float64)
    want = torch.einsum("ik,ockl,jl->ijco", g, w.double(), g).reshape((m + 2) ** 2, 5, k)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        w = torch.randn(k, 10, 3, 3)[:, ::2].copy_(w)
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = winograd.transform_weight(w, m)
            assert got.dtype == torch.float32 and got.is_contiguous()
            torch.testing.assert_close(got.double(), want, rtol=0, atol=float(want.abs().max()) * 2 ** -23)
    finally:
        torch.set_num_threads(prev)


def test_candidates_only_where_winograd_applies():
    w3 = torch.randn(8, 8, 3, 3)
    ok = _node((1, 8, 10, 10), w3, None, False, A.Conv2dAttrs(padding=(1, 1)))
    names = [k.name for k in candidates(ok, "cpu")]
    assert "cpu.winograd4_conv" in names and "cpu.winograd2_conv" in names
    declined = [
        _node((1, 8, 10, 10), w3, None, False, A.Conv2dAttrs(stride=(2, 2), padding=(1, 1))),
        _node((1, 8, 10, 10), w3, None, False, A.Conv2dAttrs(padding=(2, 2), dilation=(2, 2))),
        _node((1, 8, 10, 10), torch.randn(8, 8, 5, 5), None, False, A.Conv2dAttrs(padding=(2, 2))),
        _node((1, 8, 10, 10), torch.randn(8, 4, 3, 3), None, False, A.Conv2dAttrs(padding=(1, 1), groups=2)),
        _node((1, 8, 10, 10), w3, None, False, A.Conv2dAttrs(padding=(1, 1)), layout=LayoutKind.ROW_MAJOR),
        _node((1, 8, 10, 10), w3, None, False, A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.GELU)),
    ]
    for node in declined:
        assert not any(k.name.startswith("cpu.winograd") for k in candidates(node, "cpu"))
    # a bf16 convolution: only the bf16 F(2x2), and only where AVX512-BF16 runs it
    bf16 = _node((1, 8, 10, 10), w3.bfloat16(), None, False, A.Conv2dAttrs(padding=(1, 1)), dtype=DType.BFLOAT16)
    names = [k.name for k in candidates(bf16, "cpu") if k.name.startswith("cpu.winograd")]
    assert names == (["cpu.winograd2_conv_bf16"] if _C.winograd_bf16_supported() else [])
    assert "cpu.winograd2_conv_bf16" not in [k.name for k in candidates(ok, "cpu")]


def test_bad_arguments_are_rejected():
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()
    v = torch.empty(36, 4, 8).numpy()
    with pytest.raises(ValueError):  # m
        _C.winograd_input(x, v, 6, 6, 8, 1, 1, 3)
    with pytest.raises(ValueError):  # V too small for the tiles
        _C.winograd_input(x, torch.empty(36, 3, 8).numpy(), 6, 6, 8, 1, 1, 4)
    with pytest.raises(ValueError):  # output size of a 3x3 stride-1 conv with padding 1 is 6, not 5
        _C.winograd_input(x, v, 5, 5, 8, 1, 1, 4)
    with pytest.raises(TypeError):
        _C.winograd_input(x.astype("float64"), v, 6, 6, 8, 1, 1, 4)
    y = torch.empty(1, 6, 6, 8).numpy()
    with pytest.raises(ValueError):  # bias of the wrong length
        _C.winograd_output(torch.empty(36, 4, 8).numpy(), y, torch.empty(7).numpy(), None, False, 6, 6, 8, 1, 1, 4)
    _C.winograd_input(x, v, 6, 6, 8, 1, 1, 4)  # and the right arguments pass


def test_large_transformed_buffers_are_declined(monkeypatch):
    """Past MAX_BUFFER_BYTES per image's transformed buffer the direct convolution is left alone."""
    w = torch.randn(8, 8, 3, 3)
    node = _node((1, 8, 32, 32), w, None, False, A.Conv2dAttrs(padding=(1, 1)))
    assert winograd._accepts(node)
    monkeypatch.setattr(winograd, "MAX_BUFFER_BYTES", winograd._buffer_bytes(node, 2) - 1)
    assert not winograd._accepts(node)
    # F(2x2)'s buffers are the larger (4x the output against F(4x4)'s 2.25x); bound anyway,
    # a kernel past the limit declines to run
    k = next(k for k in kernels_for(OpKind.CONV2D, "cpu") if k.name == "cpu.winograd2_conv")
    with pytest.raises(RuntimeError):
        k.bind(node, [None, w])([torch.randn(1, 8, 32, 32).contiguous(memory_format=torch.channels_last), w],
                                node.attrs)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("chunk_images", [1, 3, 100])
def test_a_symbolic_batch_runs_any_batch_in_chunks_of_images(m, chunk_images, monkeypatch):
    """A dynamic plan's node (batch symbolic) gets Winograd as a candidate, prepared at a
    representative batch of 2 and called at others; each call runs its batch in chunks of
    whole images (here 1, 3 or every image at once), the last one shorter: the same answer
    at every batch, the buffers bounded by the chunk, not the batch."""
    from kiln.ir import Sym

    w = torch.randn(16, 8, 3, 3) * 0.2
    bias = torch.randn(16)
    attrs = A.Conv2dAttrs(padding=(1, 1), activation=RELU)
    sym = _node((Sym("batch"), 8, 9, 11), w, bias, True, attrs)
    assert f"cpu.winograd{m}_conv" in [k.name for k in candidates(sym, "cpu")]
    k = next(k for k in candidates(sym, "cpu") if k.name == f"cpu.winograd{m}_conv")
    monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_images * winograd._buffer_bytes(sym.at_sizes({"batch": 1}), m))
    fn = k.bind(sym.at_sizes({"batch": 2}), [None, w, bias, None])
    for n in (1, 3, 4, 5, 7):
        x = torch.randn(n, 8, 9, 11).contiguous(memory_format=torch.channels_last)
        r = torch.randn(n, 16, 9, 11).contiguous(memory_format=torch.channels_last)
        y = fn([x, w, bias, r], attrs)
        ref = (F.conv2d(x.double(), w.double(), bias.double(), padding=1) + r.double()).relu()
        assert y.shape == (n, 16, 9, 11) and y.is_contiguous(memory_format=torch.channels_last)
        assert (y.double() - ref).abs().max().item() < 1e-4, n


@pytest.mark.skipif(not _C.winograd_bf16_supported(), reason="needs AVX512-BF16")
@pytest.mark.parametrize("shape", [(1, 64, 14, 14, 64), (2, 20, 9, 10, 24), (1, 33, 4, 4, 16), (1, 128, 7, 7, 96)])
@pytest.mark.parametrize("epilogue", ["none", "bias_relu", "residual_relu"])
def test_bf16_f2_is_within_about_twice_a_direct_bf16_convolution(shape, epilogue):
    """bf16 in, bf16 out: against the float64 convolution of the same bf16 operands, within 1.2%
    of the output's scale and at most 4x as far off as torch's direct bf16 convolution on the
    same inputs (it rounds the transformed input and the GEMM's result besides the output)."""
    n, c, h, wd, k = shape
    g = torch.Generator().manual_seed(c * 100 + k + 7)
    w = (torch.randn(k, c, 3, 3, generator=g) * (2 / (9 * c)) ** 0.5).bfloat16()
    bias = torch.randn(k, generator=g).bfloat16() if epilogue == "bias_relu" or epilogue == "residual_relu" else None
    residual = epilogue.startswith("residual")
    attrs = A.Conv2dAttrs(padding=(1, 1), activation=RELU if epilogue.endswith("relu") else NONE)
    node = _node((n, c, h, wd), w, bias, residual, attrs, dtype=DType.BFLOAT16)
    kern = next(k for k in candidates(node, "cpu") if k.name == "cpu.winograd2_conv_bf16")
    fn = kern.bind(node, [None, w] + ([bias] if bias is not None else []) + ([None] if residual else []))
    x = torch.randn(n, c, h, wd, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    r = torch.randn(n, k, h, wd, generator=g).bfloat16().contiguous(memory_format=torch.channels_last) \
        if residual else None
    args = [x, w] + ([bias] if bias is not None else []) + ([r] if residual else [])
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = fn(args, attrs)
        finally:
            torch.set_num_threads(prev)
        assert y.dtype == torch.bfloat16 and y.shape == (n, k, h, wd)
        assert y.is_contiguous(memory_format=torch.channels_last)

        def exact(t):
            return None if t is None else t.double()
        ref = F.conv2d(x.double(), w.double(), exact(bias), padding=1)
        direct = F.conv2d(x, w, bias, padding=1)
        if residual:
            ref, direct = ref + r.double(), direct + r
        if attrs.activation is RELU:
            ref, direct = ref.relu(), direct.relu()
        scale = max(1.0, ref.abs().max().item())
        err = (y.double() - ref).abs().max().item()
        err_direct = (direct.double() - ref).abs().max().item()
        assert err <= 1.2e-2 * scale, (threads, err)
        assert err <= 4 * max(err_direct, 2 ** -9 * scale), (threads, err, err_direct)

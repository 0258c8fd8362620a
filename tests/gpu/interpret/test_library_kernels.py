"""Every Triton library kernel, run by Triton's CPU interpreter, against the torch reference."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from kiln.ir import attrs as A
from kiln.ir import qformat
from kiln.ir.attrs import Activation
from kiln.ir.reference import epilogue, rnn_hoisted_reference
from kiln.kernels.triton import attention, conv, gemm, norm, rnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interpret_device import default_device, skip_unless_runnable  # noqa: E402,F401  (an autouse fixture)

skip_unless_runnable()


@pytest.fixture(autouse=True)
def _no_device_tuning():
    """Kernels called directly take their space's default configuration (the GPU check runs
    these on a device within a fixed time)."""
    from kiln.kernels.triton.tuning import tuning_budget

    with tuning_budget("none"):
        yield


def close(out, ref, rel=1e-4):
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= rel * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("act", list(Activation))
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True)])
def test_linear_with_fused_epilogue(act, bias, residual):
    x, w = torch.randn(2, 19, 40), torch.randn(27, 40)
    b = torch.randn(27) if bias else None
    r = torch.randn(2, 19, 27) if residual else None
    close(gemm.linear(x, w, b, r, act), epilogue(F.linear(x, w, b), r, act))


@pytest.mark.parametrize("a_shape,b_shape", [((3, 17, 20), (3, 20, 9)), ((2, 1, 5, 33), (4, 33, 18)),
                                             ((6, 8), (8, 5))])
def test_batched_matmul(a_shape, b_shape):
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    close(gemm.matmul(a, b), torch.matmul(a, b))
    close(gemm.matmul(a, b.transpose(-1, -2).contiguous().transpose(-1, -2)), torch.matmul(a, b))  # strided


def test_int8_weight_only_linear():
    x, w, b = torch.randn(5, 3, 64), torch.randn(40, 64), torch.randn(40)
    wq, scale = qformat.quantize_weight_int8(w)
    assert wq.dtype == torch.int8 and wq.abs().max() <= 127 and scale.shape == (40,)
    close(gemm.int8_linear(x, wq, scale, b), F.linear(x, wq.float() * scale[:, None], b))
    close(gemm.int8_linear(x, wq, scale), F.linear(x, w), rel=3e-2)  # the quantization error itself is small


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weight_only_linear(group):
    x, w = torch.randn(7, 256), torch.randn(24, 256)
    packed, scales = qformat.quantize_weight_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128) and scales.shape == (24, 256 // group)
    # the packing follows the shared format: byte j holds k=2j (low nibble) and k=2j+1 (high)
    q = torch.clamp(torch.round(w.reshape(24, -1, group) / scales[..., None]), -8, 7).reshape(24, 256).int()
    assert torch.equal((packed[:, 3].int() & 0xF), q[:, 6] & 0xF) and torch.equal(packed[:, 3].int() >> 4, q[:, 7] & 0xF)
    ref = F.linear(x, qformat.dequantize_weight_int4(packed, scales, group))
    close(gemm.int4_linear(x, packed, scales, group), ref)
    close(gemm.int4_linear(x, packed, scales, group, bias=torch.ones(24)), ref + 1)


@pytest.mark.parametrize("case", ["none", "additive", "padding", "bool", "causal"])
def test_flash_attention(case):
    q, k, v = torch.randn(2, 3, 19, 24), torch.randn(2, 3, 37, 24), torch.randn(2, 3, 37, 24)
    mask, causal = None, False
    if case == "additive":
        mask = torch.randn(2, 3, 19, 37)
    elif case == "padding":  # BERT's [B, 1, 1, S] mask broadcasts with stride 0
        mask = torch.zeros(2, 1, 1, 37)
        mask[:, :, :, 30:] = -10000.0
    elif case == "bool":
        mask = torch.rand(2, 3, 19, 37) > 0.3
        mask[..., 0] = True
    elif case == "causal":
        q, causal = torch.randn(2, 3, 37, 24), True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    close(attention.attention(q, k, v, mask, causal), ref)


def test_layer_norm_and_softmax():
    x, w, b = torch.randn(4, 7, 33), torch.randn(33), torch.randn(33)
    close(norm.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (33,), w, b))
    close(norm.layer_norm(x, None, None, 1e-3), F.layer_norm(x, (33,), eps=1e-3))
    x2 = torch.randn(3, 5, 6)
    close(norm.layer_norm(x2, normalized_ndim=2), F.layer_norm(x2, (5, 6)))
    close(norm.softmax(x), x.softmax(-1))
    close(norm.softmax(x, log=True), x.log_softmax(-1))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,padding,dilation,groups", [((1, 1), (1, 1), (1, 1), 1), ((2, 1), (1, 2), (1, 2), 2),
                                                            ((2, 2), (3, 3), (1, 1), 1)])
def test_conv2d_implicit_gemm(channels_last, stride, padding, dilation, groups):
    x = torch.randn(2, 6, 11, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kh = 7 if padding == (3, 3) else 3
    w, b = torch.randn(8, 6 // groups, kh, 3), torch.randn(8)
    ref = F.conv2d(x, w, b, stride, padding, dilation, groups)
    r = torch.randn_like(ref)
    out = conv.conv2d(x, w, b, r, stride, padding, dilation, groups, Activation.RELU)
    close(out, F.relu(ref + r))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("is_max,count_pad,ceil", [(True, True, False), (True, True, True), (False, True, False),
                                                   (False, False, False)])
def test_pool2d(is_max, count_pad, ceil):
    x = torch.randn(2, 5, 12, 11).contiguous(memory_format=torch.channels_last)
    out = conv.pool2d(x, (3, 3), (2, 2), (1, 1), ceil_mode=ceil, is_max=is_max, count_include_pad=count_pad)
    ref = F.max_pool2d(x, 3, 2, 1, ceil_mode=ceil) if is_max else \
        F.avg_pool2d(x, 3, 2, 1, ceil_mode=ceil, count_include_pad=count_pad)
    close(out, ref)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_rnn_step_kernel(mode, batch_first):
    steps, bsz, hid = 5, 3, 20
    gates = 4 if mode == "LSTM" else 3
    xp = torch.randn((bsz, steps, gates * hid) if batch_first else (steps, bsz, gates * hid))
    h0, c0 = torch.randn(1, bsz, hid), torch.randn(1, bsz, hid)
    w, b = torch.randn(gates * hid, hid) * 0.3, torch.randn(gates * hid)
    attrs = A.RNNAttrs(hid, batch_first=batch_first, proj_hoisted=True)
    if mode == "LSTM":
        out = rnn.rnn_hoisted(xp, h0, c0, w, None, batch_first, True)
        ref = rnn_hoisted_reference([xp, h0, c0, w], attrs, mode)
    else:
        out = rnn.rnn_hoisted(xp, h0, None, w, b, batch_first, False)
        ref = rnn_hoisted_reference([xp, h0, w, b], attrs, mode)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        close(o, r)

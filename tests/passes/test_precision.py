"""precision="bf16" on whole models: GEMMs, convs and attention in bfloat16, checked against fp32
(the pass graph by graph: tests/passes/test_precision_pass.py)."""
import pytest
import torch

import kiln
from kiln import KilnError, models
from kiln.ir import DType, OpKind

TOL = 3e-2  # bf16 keeps 8 bits of mantissa: outputs within 3% of max(1, |fp32 output|max)


def _close(out, ref):
    err = (out.float() - ref.float()).abs().max().item()
    return err <= TOL * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("name,kw", [("resnet18", {"image": 64}), ("bert", {"layers": 2, "seq": 32}),
                                     ("hf_bert", {"layers": 2, "seq": 32}), ("lstm", {"seq": 24})])
def test_bf16_matches_fp32_within_tolerance(name, kw):
    model, inputs = models.get(name, **kw)
    fast = kiln.compile(model, inputs, precision="bf16")
    with torch.no_grad():
        ref = model(*inputs)
    out = fast(*inputs)
    ref, out = (ref.logits, out.logits) if hasattr(ref, "logits") else (ref, out)
    ok, err = _close(out, ref)
    assert ok, err
    assert out.dtype == torch.float32  # the model's interface stays fp32
    g = fast.compiled[0].graph
    heavy = [n for n in g.nodes if n.op in (OpKind.LINEAR, OpKind.CONV2D, OpKind.MATMUL, OpKind.ATTENTION)]
    assert heavy and all(n.outputs[0].dtype is DType.BFLOAT16 for n in heavy)


def test_bf16_top1_agreement_on_random_inputs():
    model, _ = models.resnet18(image=64)
    fast = kiln.compile(model, (torch.randn(8, 3, 64, 64),), precision="bf16")
    agree = total = 0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(8, 3, 64, 64, generator=g)
            agree += int((fast(x).argmax(1) == model(x).argmax(1)).sum())
            total += 8
    assert agree / total >= 0.9, f"top-1 agreement {agree}/{total}"


def test_precision_option_is_checked():
    model, inputs = models.lstm(seq=8)
    with pytest.raises(KilnError, match="precision must be one of"):
        kiln.compile(model, inputs, precision="fp8")


class _WeightStandardizedConv(torch.nn.Conv2d):
    """BiT's convolution: its weight standardized per output channel on every call (as
    transformers' BitWeightStandardizedConv2d does, through a batch norm without statistics)."""

    def forward(self, x):
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                           training=True, momentum=0.0, eps=1e-8).reshape_as(self.weight)
        return torch.nn.functional.conv2d(x, w, None, self.stride, self.padding)


def test_bf16_weights_computed_from_constants_fold_in_fp32_and_round_once():
    # the fold phase runs before the precision phase: a weight that depends only on
    # constants is computed in fp32 at compile time, and the bf16 conv gets it rounded once
    # (not the fp32 weight rounded, then standardized in bf16)
    torch.manual_seed(0)
    conv = _WeightStandardizedConv(16, 32, 3, padding=1, bias=False).eval()
    with torch.no_grad():
        conv.weight.mul_(0.05).add_(0.3)  # far from standardized: the fold has work to do
    x = torch.randn(1, 16, 12, 12)
    fast = kiln.compile(conv, (x,), precision="bf16")
    g = fast.compiled[0].graph
    convs = [n for n in g.nodes if n.op is OpKind.CONV2D]
    assert len(convs) == 1 and convs[0].outputs[0].dtype is DType.BFLOAT16
    assert not [n for n in g.nodes if n.op in (OpKind.MEAN, OpKind.RSQRT, OpKind.BATCH_NORM)]  # all folded
    w = g.constants[convs[0].inputs[1]]
    want = torch.nn.functional.batch_norm(conv.weight.detach().reshape(1, 32, -1), None, None, training=True,
                                          eps=1e-8).reshape_as(conv.weight)
    assert w.dtype == torch.bfloat16
    # rounded once to the nearest bf16 (half a step: at most 2^-8 of the value), with a little
    # slack for the fold's own fp32 arithmetic; standardizing in bf16 is far further off
    err = (w.float() - want).abs()
    assert (err <= want.abs() * 2.0 ** -8 + 1e-4).all(), err.max()
    in_bf16 = torch.nn.functional.batch_norm(conv.weight.detach().bfloat16().reshape(1, 32, -1), None, None,
                                             training=True, eps=1e-8).reshape_as(conv.weight).float()
    assert err.max() * 4 < (in_bf16 - want).abs().max()
    with torch.no_grad():
        ok, err = _close(fast(x), conv(x))
    assert ok, err

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

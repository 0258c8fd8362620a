"""precision="bf16": GEMMs, convs and attention in bfloat16, checked against fp32."""
import pytest
import torch

import kiln
from kiln.options import CompileOptions
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


def test_bf16_max_pool_between_convs_stays_bf16_when_read_twice():
    """ResNet's stem: conv -> max-pool -> (conv, residual). The pooled value has two bf16
    readers, so two casts until CSE merges them; the round trip must still go."""
    from kiln.passes.pipeline import run_pipeline
    from kiln.ir import GraphBuilder
    from kiln.ir import attrs as A

    b = GraphBuilder("stem")
    x = b.input("x", (1, 4, 8, 8))
    w1, w2 = b.const(torch.randn(4, 4, 3, 3)), b.const(torch.randn(4, 4, 3, 3))
    y = b.add(OpKind.CONV2D, x, w1, attrs=A.Conv2dAttrs(padding=(1, 1)))
    p = b.add(OpKind.MAX_POOL2D, y, attrs=A.Pool2dAttrs(kernel=(2, 2), stride=(2, 2)))
    z = b.add(OpKind.CONV2D, p, w2, None, p, attrs=A.Conv2dAttrs(padding=(1, 1)))
    g = b.build((z,))
    out = run_pipeline(g, select=["precision"], options=CompileOptions.parse(precision="bf16"), verify_each=True).graph
    pool = [n for n in out.nodes if n.op is OpKind.MAX_POOL2D]
    assert len(pool) == 1 and pool[0].outputs[0].dtype is DType.BFLOAT16
    assert sum(n.op is OpKind.CAST for n in out.nodes) == 2  # x in, result out


def test_bf16_attention_takes_qkv_sliced_from_the_bf16_gemm():
    """BERT's fused QKV GEMM: its bf16 output is sliced into Q, K, V and the heads split
    (slice -> reshape -> permute). Casting to f32 and back around those views is exact, so
    no cast remains between the GEMM and the attention, and the result still matches."""
    from kiln.passes.pipeline import run_pipeline
    from kiln.ir import GraphBuilder
    from kiln.ir import attrs as A

    b = GraphBuilder("qkv")
    x = b.input("x", (1, 8, 16))
    qkv = b.add(OpKind.LINEAR, x, b.const(torch.randn(48, 16)))
    heads = []
    for i in range(3):
        s = b.add(OpKind.SLICE, qkv, attrs=A.SliceAttrs(axis=2, start=16 * i, end=16 * (i + 1)))
        r = b.add(OpKind.RESHAPE, s, attrs=A.ShapeAttrs((1, 8, 2, 8)))
        heads.append(b.add(OpKind.PERMUTE, r, attrs=A.PermuteAttrs((0, 2, 1, 3))))
    y = b.add(OpKind.ATTENTION, *heads, attrs=A.AttentionAttrs())
    g = b.build((y,))
    out = run_pipeline(g, select=["precision"], options=CompileOptions.parse(precision="bf16"), verify_each=True).graph
    attn = next(n for n in out.nodes if n.op is OpKind.ATTENTION)
    producer = out.producers()
    for v in attn.inputs:  # each operand is a view chain straight off the bf16 GEMM
        n = producer[v]
        while n.op is not OpKind.LINEAR:
            assert n.op in (OpKind.PERMUTE, OpKind.RESHAPE, OpKind.SLICE), n.op
            n = producer[n.inputs[0]]
    assert n.outputs[0].dtype is DType.BFLOAT16
    assert sum(n.op is OpKind.CAST for n in out.nodes) == 2  # x in, result out

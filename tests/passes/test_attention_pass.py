"""attention (passes/attention.py): matmul -> scale -> (mask) -> softmax -> matmul becomes
one ATTENTION op for additive, boolean and causal masks; it declines when the
probabilities are also an output."""
import torch

from kiln.ir import DType, OpKind
from kiln.ir import attrs as A
from kiln.passes.pipeline import run_pipeline

from conftest import assert_same_outputs, assert_structural_equal, random_inputs
from graphs import build, run_pass


def _heads(b, x, perm=(0, 2, 1, 3)):
    return b.add(OpKind.PERMUTE, b.add(OpKind.RESHAPE, x, attrs=A.ShapeAttrs((2, 5, 2, 4))), attrs=A.PermuteAttrs(perm))


def _attn_before(mask_kind):
    def fn(b, q, k, v, *m):
        kt = _heads(b, k, (0, 2, 3, 1))  # head split + transpose in one permute, as exporters write it
        s = b.add(OpKind.MATMUL, _heads(b, q), kt)
        s = b.add(OpKind.DIV, s, b.const(torch.tensor(2.0)))
        if mask_kind == "add":
            s = b.add(OpKind.ADD, s, m[0])
        elif mask_kind == "bool":
            s = b.add(OpKind.WHERE, m[0], s, b.const(torch.tensor(float("-inf"))))
        elif mask_kind == "causal":
            s = b.add(OpKind.ADD, s, b.const(torch.full((5, 5), float("-inf")).triu(1)))
        p = b.add(OpKind.SOFTMAX, s, attrs=A.AxisAttrs(3))
        o = b.add(OpKind.MATMUL, p, _heads(b, v))
        return b.add(OpKind.RESHAPE, b.add(OpKind.PERMUTE, o, attrs=A.PermuteAttrs((0, 2, 1, 3))),
                     attrs=A.ShapeAttrs((2, 5, 8)))
    return fn


def _attn_expected(mask_kind):
    def fn(b, q, k, v, *m):
        ins = [_heads(b, q), _heads(b, k), _heads(b, v)] + ([m[0]] if mask_kind in ("add", "bool") else [])
        o = b.add(OpKind.ATTENTION, *ins, attrs=A.AttentionAttrs(None, mask_kind == "causal"))
        return b.add(OpKind.RESHAPE, b.add(OpKind.PERMUTE, o, attrs=A.PermuteAttrs((0, 2, 1, 3))),
                     attrs=A.ShapeAttrs((2, 5, 8)))
    return fn


def test_attention_fusion_masks_and_causal():
    for kind, extra, dt in (("none", [], None), ("add", [(2, 1, 1, 5)], None), ("bool", [(2, 1, 5, 5)], DType.BOOL),
                            ("causal", [], None)):
        shapes = [(2, 5, 8)] * 3 + extra
        dtypes = {3: dt} if dt else None
        g = build(_attn_before(kind), *shapes, dtypes=dtypes)
        out = run_pipeline(g, select=["canonicalize", "attention", "simplify"], verify_each=True).graph
        assert_structural_equal(out, build(_attn_expected(kind), *shapes, dtypes=dtypes))
        inputs = None
        if kind == "bool":
            inputs = random_inputs(g)
            inputs[3] = inputs[3] | torch.eye(5, dtype=torch.bool)  # no fully masked rows
        assert_same_outputs(g, out, inputs)


def test_attention_declines_when_probabilities_are_also_returned():
    def fn(b, q, k, v):
        s = b.add(OpKind.MATMUL, _heads(b, q), _heads(b, k, (0, 2, 3, 1)))
        p = b.add(OpKind.SOFTMAX, s, attrs=A.AxisAttrs(3))
        return b.add(OpKind.MATMUL, p, _heads(b, v)), p

    g = build(fn, (2, 5, 8), (2, 5, 8), (2, 5, 8))
    out = run_pass("attention", g)
    assert out.count(OpKind.ATTENTION) == 0
    assert_structural_equal(out, g)
    assert_same_outputs(g, out)

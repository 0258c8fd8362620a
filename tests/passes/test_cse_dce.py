"""cse and dce (passes/cse.py, passes/rewrite.py; in every cleanup): identical nodes and
small equal constants merge; nodes and constants no output needs go."""
import torch

from kiln.ir import OpKind
from kiln.passes.cse import cse

from conftest import assert_same_outputs, assert_structural_equal
from graphs import build, run_pass


def test_cse_merges_identical_nodes_and_small_constants():
    def before(b, x):
        a = b.add(OpKind.MUL, b.add(OpKind.EXP, x), b.const(torch.tensor(2.0)))
        c = b.add(OpKind.MUL, b.add(OpKind.EXP, x), b.const(torch.tensor(2.0)))
        return b.add(OpKind.ADD, a, c)

    def expected(b, x):
        a = b.add(OpKind.MUL, b.add(OpKind.EXP, x), b.const(torch.tensor(2.0)))
        return b.add(OpKind.ADD, a, a)

    g = build(before, (3,))
    out = cse(g)
    assert_structural_equal(out, build(expected, (3,)))
    assert_same_outputs(g, out)
    # the same through the pipeline's pass of that name
    assert_structural_equal(run_pass("cse", g), build(expected, (3,)))
    assert len(run_pass("cse", g).nodes) == 3


def test_cse_keeps_constants_that_differ():
    def before(b, x):
        return b.add(OpKind.ADD, b.add(OpKind.MUL, x, b.const(torch.tensor(2.0))),
                     b.add(OpKind.MUL, x, b.const(torch.tensor(3.0))))

    g = build(before, (3,))
    out = run_pass("cse", g)
    assert len(out.nodes) == 3 and len(out.constants) == 2
    assert_same_outputs(g, out)


def test_dce_drops_nodes_and_constants_no_output_needs():
    w = torch.randn(3)

    def before(b, x):
        b.add(OpKind.MUL, b.add(OpKind.EXP, x), b.const(w, "unused_w"))  # computed, never read
        return b.add(OpKind.RELU, x)

    def expected(b, x):
        return b.add(OpKind.RELU, x)

    g = build(before, (3,))
    out = run_pass("dce", g)
    assert_structural_equal(out, build(expected, (3,)))
    assert out.op_counts() == {"relu": 1} and not out.constants
    assert_same_outputs(g, out)

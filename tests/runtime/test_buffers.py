"""Buffer lifetimes (runtime/buffers.py): where intermediates die, and the most bytes a plan
holds at once, from its own step order and frees."""
import torch

from kiln.ir import GraphBuilder, OpKind, Sym
from kiln.runtime.buffers import dead_values, graph_memory
from kiln.runtime.plan import build_plan

KIB = 1024  # bytes of a [256] float32 value


def _chain():
    """x -> relu -> exp -> neg (returned), plus a sigmoid nothing reads."""
    b = GraphBuilder("chain")
    x = b.input("x", (256,))
    r = b.add(OpKind.RELU, x)
    b.add(OpKind.SIGMOID, x)
    e = b.add(OpKind.EXP, r)
    return b.build([b.add(OpKind.NEG, e)])


def test_values_die_after_their_last_use_and_kept_values_never():
    g = _chain()
    units = [(n.inputs, n.outputs) for n in g.nodes]
    dead = dead_values(units, set(g.inputs) | set(g.outputs))
    relu, sigmoid, exp, neg = (n.outputs[0] for n in g.nodes)
    assert dead == [[], [sigmoid], [relu], [exp]]  # the input and the returned value stay


def test_peak_counts_what_is_live_at_each_step():
    g = _chain()
    stats = graph_memory(g)
    assert stats.buffers == 4 and stats.total_bytes == 4 * KIB
    # relu and the unread sigmoid are live together; then relu while exp is made; then exp while neg is made
    assert stats.peak_bytes == 2 * KIB


def test_a_plan_reports_the_memory_of_its_own_steps():
    g = _chain()
    plan = build_plan(g, "reference")  # one step per node, in order: what graph_memory assumes
    assert plan.memory == graph_memory(g)
    with torch.no_grad():
        x = torch.randn(256)
        torch.testing.assert_close(plan.run([x])[0], -torch.exp(torch.relu(x)))


def test_unknown_sizes_are_left_out():
    b = GraphBuilder("dynamic")
    x = b.input("x", (Sym("batch"), 8))
    g = b.build([b.add(OpKind.EXP, b.add(OpKind.RELU, x))])
    stats = graph_memory(g)
    assert stats.buffers == 0 and stats.peak_bytes == 0

"""How big a TensorIR expression is to TVM's passes, and the bounds the renderer keeps to.

A TIR expression shares subexpressions in memory, but TVM's simplifier works on it as a
tree, under one constraint per enclosing select. Forms that read their operand more than
once (a clamp's or ReLU's selects, GELU's branches, ``tvm_math``'s vector math) multiply
their operand's expression, chains of them exponentially, and the build time grows faster
than the tree (``python -m kiln.bench.select_chains``; the figures are in
docs/benchmarks.md). Where a node's expression would pass ``MAX_SELECT_DEPTH`` or
``MAX_EXPRESSION_NODES``, ``codegen.tvm.render`` stores its operands to stages of their own
(buffers the size of the values, named with the ``KEPT`` prefix) that it loads. The groups
of the example and suite models stay within both bounds (softmax and GELU: four selects
deep in fp32, five in a bf16 decoder's masked softmax; under a thousand nodes in fp32, 3,500
in bf16, where the vector math is written out at each use).
"""
from __future__ import annotations

MAX_SELECT_DEPTH = 5
MAX_EXPRESSION_NODES = 4096
KEPT = "kept"  # name prefix of the stages stored for the bounds

# the fields through which TIR expressions (and TE's reductions) hold their operands
_FIELDS = ("source", "a", "b", "condition", "true_value", "false_value", "value", "body", "args", "indices")


def _fold(expr, leaf_and_combine):
    """Post-order over ``expr``'s distinct nodes (by identity, without recursion: fused
    expressions can be thousands deep), each node's result ``leaf_and_combine(node, results
    of its operands)``; the root's result."""
    from tvm import ir
    from tvm_ffi import Array

    arrays = (list, tuple, Array)

    def operands(e):
        out = []
        for field in _FIELDS:
            c = getattr(e, field, None)
            out.extend(x for x in (c if isinstance(c, arrays) else (c,)) if isinstance(x, ir.expr.Expr))
        return out

    done: dict = {}  # hash (TVM objects hash by identity) -> result
    stack = [(expr, None)]
    while stack:
        e, ops = stack.pop()
        key = hash(e)
        if key in done:
            continue
        if ops is None:
            ops = operands(e)
            stack.append((e, ops))
            stack.extend((x, None) for x in ops if hash(x) not in done)
        else:
            done[key] = leaf_and_combine(e, [done[hash(x)] for x in ops])
    return done[hash(expr)]


def measure(expr, limit: int) -> tuple[int, int]:
    """(``select_depth``, ``expression_nodes``) of ``expr`` in one walk."""
    from tvm import ir, tirx

    def both(e, below):
        own = isinstance(e, tirx.Select) or (isinstance(e, ir.expr.Call)
                                             and getattr(e.op, "name", "") == "tirx.if_then_else")
        return (max((d for d, _ in below), default=0) + own, min(1 + sum(n for _, n in below), limit + 1))

    return _fold(expr, both)


def select_depth(expr) -> int:
    """The most selects (``Select``, ``if_then_else``) on one path from ``expr`` to a leaf."""
    return measure(expr, 0)[0]


def expression_nodes(expr, limit: int) -> int:
    """The number of nodes of ``expr`` written out as a tree (a subexpression counts at each
    place it is used), counted over its distinct nodes; past ``limit``, ``limit + 1``."""
    return measure(expr, limit)[1]


def past_bounds(expr) -> bool:
    depth, nodes = measure(expr, MAX_EXPRESSION_NODES)
    return depth > MAX_SELECT_DEPTH or nodes > MAX_EXPRESSION_NODES


def stages(outs) -> list:
    """Every TE stage the output tensors ``outs`` compute from (outputs, stored stages,
    reductions, placeholders), each once."""
    seen, stack = {}, list(outs)
    while stack:
        t = stack.pop()
        if t.op.name not in seen:
            seen[t.op.name] = t
            stack.extend(t.op.input_tensors)
    return list(seen.values())


def kept_stages(outs) -> list[str]:
    """The names of the stages ``render`` stored for the bounds (and a norm's per-row
    values), which the schedule must keep rather than inline into their readers."""
    return [t.op.name for t in stages(outs) if t.op.name.startswith(KEPT)]

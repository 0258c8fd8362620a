"""The IR verifier: every invariant a well-formed graph keeps. Runs after every pass in tests."""
from __future__ import annotations

from .graph import Graph, Value
from .ops import IRTypeError, OpKind, infer_types, opdef
from .dtypes import DType


class VerifyError(ValueError):
    """The graph breaks an IR invariant."""


def verify(graph: Graph) -> Graph:
    """Check SSA form, topological order, operand counts and types; return the graph."""
    defined: set[Value] = set()
    errors: list[str] = []

    def define(v: Value, where: str):
        if not isinstance(v, Value):
            errors.append(f"{where}: {v!r} is not a Value")
            return
        if v in defined:
            errors.append(f"{where}: value %{v.name} defined twice")
        defined.add(v)

    for v in graph.inputs:
        define(v, "input")
    for v, t in graph.constants.items():
        define(v, "constant")
        if tuple(t.shape) != tuple(v.type.shape):
            errors.append(f"constant %{v.name}: tensor shape {tuple(t.shape)} != declared {v.type.shape}")
        elif v.type.dtype is not DType.INT4 and t.dtype != v.type.dtype.to_torch():
            errors.append(f"constant %{v.name}: tensor dtype {t.dtype} != declared {v.type.dtype.value}")
    if set(graph.inputs) & set(graph.constants):
        errors.append("a value is both an input and a constant")

    for i, n in enumerate(graph.nodes):
        where = f"node {i} ({n.op.value}{', ' + n.scope if n.scope else ''})"
        if not isinstance(n.op, OpKind):
            errors.append(f"{where}: op is not an OpKind")
            continue
        for v in n.inputs:
            if v is None:
                continue
            if v not in defined:
                errors.append(f"{where}: operand %{getattr(v, 'name', v)} is not defined before use "
                              f"(dangling value or cycle)")
        d = opdef(n.op)
        if not isinstance(n.attrs, d.attrs):
            errors.append(f"{where}: attrs {type(n.attrs).__name__} != {d.attrs.__name__}")
        else:
            try:
                types = infer_types(n.op, [None if v is None else v.type for v in n.inputs], n.attrs)
            except IRTypeError as e:
                errors.append(f"{where}: {e}")
            else:
                if len(types) != len(n.outputs):
                    errors.append(f"{where}: {len(n.outputs)} outputs, op produces {len(types)}")
                for t, v in zip(types, n.outputs):
                    if (t.dtype, t.shape) != (v.type.dtype, v.type.shape):
                        errors.append(f"{where}: output %{v.name} declared {v.type!r}, inferred {t!r}")
                if n.op is OpKind.TO_LAYOUT and n.outputs[0].type.layout != n.attrs.layout:
                    errors.append(f"{where}: output layout {n.outputs[0].type.layout!r} != {n.attrs.layout!r}")
        for v in n.outputs:
            define(v, where)

    for v in graph.outputs:
        if v not in defined:
            errors.append(f"output %{getattr(v, 'name', v)} is not defined")
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise VerifyError(f"graph {graph.name!r} is malformed:\n  " + "\n  ".join(errors[:20]) + more)
    return graph

"""A readable, stable text form of a graph: one line per node, like MLIR or TVMScript."""
from __future__ import annotations

import dataclasses
import enum

from .graph import Graph, Node, Value


def format_attr_value(v) -> str:
    if isinstance(v, enum.Enum):
        return v.value if isinstance(v.value, str) else v.name
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(format_attr_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if dataclasses.is_dataclass(v):
        return repr(v)
    return repr(v)


def format_attrs(attrs) -> str:
    """Non-default attribute fields as ``{k=v, ...}`` (empty string when all are defaults)."""
    parts = []
    for f in dataclasses.fields(attrs):
        v = getattr(attrs, f.name)
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if v == default:
            continue
        if f.name == "out_types":
            continue  # shown as the node's result types
        parts.append(f"{f.name}={format_attr_value(v)}")
    return "{" + ", ".join(parts) + "}" if parts else ""


def _ref(v: Value | None) -> str:
    return "_" if v is None else f"%{v.name}"


def format_node(n: Node) -> str:
    outs = ", ".join(_ref(v) for v in n.outputs)
    args = ", ".join(_ref(v) for v in n.inputs)
    attrs = format_attrs(n.attrs)
    types = ", ".join(repr(v.type) for v in n.outputs)
    line = f"{outs} = {n.op.value}({args})" + (f" {attrs}" if attrs else "") + f" : {types}"
    if n.scope:
        line += f"  # {n.scope}"
    return line


def format_graph(g: Graph, show_constants: bool = True) -> str:
    sig = ", ".join(f"%{v.name}: {v.type!r}" for v in g.inputs)
    lines = [f"graph @{g.name}({sig}) {{"]
    if show_constants:
        for v in g.constants:
            lines.append(f"  const %{v.name} : {v.type!r}")
    for n in g.nodes:
        lines.append("  " + format_node(n))
    lines.append("  return " + ", ".join(_ref(v) for v in g.outputs))
    lines.append("}")
    return "\n".join(lines)

"""Kiln's graph IR: a small, typed SSA graph of immutable nodes.

>>> from kiln.ir import GraphBuilder, OpKind, DType
>>> b = GraphBuilder("demo"); x = b.input("x", (2, 3))
>>> g = b.build([b.add(OpKind.RELU, x)])
"""
from . import attrs
from .attrs import *  # noqa: F401,F403  (attribute records are part of the IR's vocabulary)
from .dtypes import DType, QScheme, QuantSpec
from .graph import Graph, GraphBuilder, Node, Value
from .ops import OPS, Category, IRTypeError, OpDef, OpKind, broadcast_shapes, infer_types, opdef, promote_types
from .printer import format_graph, format_node
from .serialize import SerializeError, from_json, load, save, structural_hash, to_json
from .types import ROW_MAJOR, Dim, Layout, LayoutKind, Sym, TensorType
from .verify import VerifyError, verify

__all__ = ["attrs", "DType", "QScheme", "QuantSpec", "Graph", "GraphBuilder", "Node", "Value", "OPS", "Category",
           "IRTypeError", "OpDef", "OpKind", "broadcast_shapes", "infer_types", "opdef", "promote_types",
           "format_graph", "format_node", "SerializeError", "from_json", "load", "save", "structural_hash",
           "to_json", "ROW_MAJOR", "Dim", "Layout", "LayoutKind", "Sym", "TensorType", "VerifyError", "verify"]

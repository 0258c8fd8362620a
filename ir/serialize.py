"""JSON save/load that round-trips exactly, and a structural hash.

Attribute records are encoded field by field with their type tags, so loading rebuilds
the same frozen dataclasses; constants are stored as raw little-endian bytes (base64).
"""
from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import json
from typing import Any

import torch

from . import attrs as A
from . import dtypes as D
from . import types as T
from .graph import Graph, Node, Value
from .ops import OpKind, opdef

FORMAT = "kiln-graph"
VERSION = 1

# every record type that may appear inside attributes or types, by name
_RECORDS: dict[str, type] = {c.__name__: c for c in [
    *(getattr(A, n) for n in dir(A) if dataclasses.is_dataclass(getattr(A, n))),
    T.TensorType, T.Layout, T.Sym, D.QuantSpec]}
_ENUMS: dict[str, type] = {c.__name__: c for c in [D.DType, D.QScheme, T.LayoutKind, A.GeluApprox, A.PadMode,
                                                    A.Activation, A.Rounding, A.ScatterReduce]}


class SerializeError(ValueError):
    pass


def encode(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return {"f": repr(v)}  # repr round-trips every float, inf and nan included
    if isinstance(v, enum.Enum):
        return {"enum": type(v).__name__, "v": v.value}
    if isinstance(v, tuple):
        return [encode(x) for x in v]
    if dataclasses.is_dataclass(v):
        return {"rec": type(v).__name__, **{f.name: encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return {"torch": str(v)}
    raise SerializeError(f"cannot encode {type(v).__name__}: {v!r}")


def decode(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, list):
        return tuple(decode(x) for x in v)
    if isinstance(v, dict):
        if "f" in v:
            return float(v["f"])
        if "enum" in v:
            return _ENUMS[v["enum"]](v["v"])
        if "torch" in v:
            s = v["torch"]
            if s.startswith("torch."):
                return getattr(torch, s[len("torch."):])
            return torch.device(s)
        if "rec" in v:
            cls = _RECORDS.get(v["rec"])
            if cls is None:
                raise SerializeError(f"unknown record type {v['rec']!r}")
            return cls(**{k: decode(x) for k, x in v.items() if k != "rec"})
    raise SerializeError(f"cannot decode {v!r}")


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(tuple(shape)).clone()


def _constant(v_doc: dict, t: torch.Tensor, ref: str | None) -> dict:
    if ref is not None:  # stored elsewhere (a model's parameter): only its name and dtype
        return {**v_doc, "dtype": str(t.dtype), "ref": ref}
    return {**v_doc, "dtype": str(t.dtype), "data": base64.b64encode(tensor_to_bytes(t)).decode()}


def to_json(g: Graph, refs: dict[Value, str] | None = None) -> str:
    """``refs`` names constants to store by reference instead of by value (``from_json``
    then needs ``resolve``)."""
    refs = refs or {}
    ids: dict[Value, int] = {}

    def vid(v: Value) -> int:
        if v not in ids:
            ids[v] = len(ids)
        return ids[v]

    def val(v: Value) -> dict:
        return {"id": vid(v), "name": v.name, "type": encode(v.type)}

    doc = {
        "format": FORMAT, "version": VERSION, "name": g.name,
        "inputs": [val(v) for v in g.inputs],
        "constants": [_constant(val(v), t, refs.get(v)) for v, t in g.constants.items()],
        "nodes": [{"op": n.op.value, "inputs": [None if v is None else vid(v) for v in n.inputs],
                   "attrs": encode(n.attrs), "outputs": [val(v) for v in n.outputs], "scope": n.scope}
                  for n in g.nodes],
    }
    doc["outputs"] = [vid(v) for v in g.outputs]
    return json.dumps(doc)


def from_json(text: str, resolve=None) -> Graph:
    """``resolve(name) -> Tensor`` supplies constants stored by reference; a missing one or
    one whose dtype or shape differs from the recorded type is a ``SerializeError``."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise SerializeError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializeError("not a Kiln graph file")
    if doc.get("version") != VERSION:
        raise SerializeError(f"unsupported Kiln graph version {doc.get('version')!r}")
    vals: dict[int, Value] = {}

    def mk(d: dict) -> Value:
        v = Value(decode(d["type"]), d["name"])
        vals[d["id"]] = v
        return v

    def ref(i):
        if i is None:
            return None
        if i not in vals:
            raise SerializeError(f"value {i} used before definition")
        return vals[i]

    inputs = tuple(mk(d) for d in doc["inputs"])
    constants = {}
    for d in doc["constants"]:
        v = mk(d)
        dt = getattr(torch, d["dtype"].removeprefix("torch."))
        if "ref" in d:
            t = resolve(d["ref"]) if resolve is not None else None
            if not isinstance(t, torch.Tensor) or t.dtype != dt or tuple(t.shape) != tuple(v.type.shape):
                raise SerializeError(f"constant {d['ref']!r}: missing or not a {dt} tensor of shape {v.type.shape}")
            constants[v] = t.detach()
        else:
            constants[v] = tensor_from_bytes(base64.b64decode(d["data"]), dt, v.type.shape)
    nodes = []
    for d in doc["nodes"]:
        op = OpKind(d["op"])
        node_inputs = tuple(ref(i) for i in d["inputs"])
        attrs = decode(d["attrs"])
        if not isinstance(attrs, opdef(op).attrs):
            raise SerializeError(f"{op.value}: bad attrs {attrs!r}")
        nodes.append(Node(op, node_inputs, attrs, tuple(mk(o) for o in d["outputs"]), d.get("scope", "")))
    outputs = tuple(ref(i) for i in doc["outputs"])
    return Graph(inputs, tuple(nodes), outputs, constants, doc.get("name", "graph"))


def save(g: Graph, path) -> None:
    with open(path, "w") as f:
        f.write(to_json(g))


def load(path) -> Graph:
    with open(path) as f:
        return from_json(f.read())


def structural_hash(g: Graph, include_constants: bool = True) -> str:
    """A hash of what the graph computes: ops, attributes, types, wiring and weights.

    Merkle-style: each value's hash covers the op that made it and its operands' hashes,
    so value names, node scopes, the order of independent nodes and the order constants
    were declared in never change it, and dead nodes do not count. With
    ``include_constants=False`` constants are compared by type only.
    """
    memo: dict[Value, bytes] = {}

    def digest(*parts) -> bytes:
        return hashlib.sha256("|".join(parts).encode()).digest()

    for i, v in enumerate(g.inputs):
        memo[v] = digest("in", str(i), repr(v.type))
    for v, t in g.constants.items():
        data = hashlib.sha256(tensor_to_bytes(t)).hexdigest() if include_constants else ""
        memo[v] = digest("const", repr(v.type), data)
    for n in g.nodes:
        attrs = json.dumps(encode(n.attrs), sort_keys=True)
        ins = ",".join("-" if v is None else memo.get(v, b"?").hex() for v in n.inputs)
        for i, o in enumerate(n.outputs):
            memo[o] = digest(n.op.value, attrs, ins, str(i), repr(o.type))
    h = hashlib.sha256()
    for v in g.inputs:
        h.update(memo[v])
    h.update(b"->")
    for v in g.outputs:
        h.update(memo.get(v, b"?"))
    return h.hexdigest()

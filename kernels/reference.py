"""The ``reference`` kernels: the IR's own meaning of each op (``kiln.ir.reference``), run
in torch. Every op kind has one; it is every node's fallback and the oracle the other
kernels are checked against. FALLBACK nodes run the ATen op they name."""
from __future__ import annotations

import torch

from kiln.ir import OpKind
from kiln.ir import attrs as A
from kiln.ir.reference import REFERENCE

from .registry import register_kernel

for _op, _fn in REFERENCE.items():  # torch ops: they take every size from their inputs
    register_kernel(_op, "reference", name=f"reference.{_op.value}", dynamic=True)(_fn)


def _resolve_target(name: str):
    # "aten.foo.default" -> torch.ops.aten.foo.default; only torch's op namespaces are allowed
    parts = name.split(".")
    # ("kiln" holds the leaf ops nn.LSTM/nn.GRU export as: frontends/torch_rnn.py)
    if len(parts) < 2 or parts[0] not in ("aten", "prims", "quantized", "torchvision", "kiln"):
        raise ValueError(f"fallback target {name!r} is not a torch op")
    if parts[0] == "kiln":
        import kiln.frontends.torch_rnn  # noqa: F401  (registers torch.ops.kiln.*)
    obj = torch.ops
    for p in parts:
        obj = getattr(obj, p)
    return obj


def _fill(template, ins):
    if isinstance(template, tuple) and len(template) == 2 and template[0] == "$":
        return ins[template[1]]
    if isinstance(template, tuple) and len(template) == 2 and template[0] == "$list":
        return [_fill(t, ins) for t in template[1]]
    if isinstance(template, tuple):
        return tuple(_fill(t, ins) for t in template)
    return template


@register_kernel(OpKind.FALLBACK, "reference", name="reference.fallback", dynamic=True)
def fallback(ins, a: A.FallbackAttrs):
    fn = _resolve_target(a.target)
    out = fn(*_fill(a.args, ins), **{k: _fill(v, ins) for k, v in a.kwargs})
    if isinstance(out, (tuple, list)):  # the node's outputs are the tensor results, in order
        outs = tuple(o for o in out if isinstance(o, torch.Tensor))
        return outs[0] if len(a.out_types) == 1 else outs
    return out



"""PyTorch frontend: ``torch.export`` an ``nn.Module`` and convert its ATen graph to Kiln IR.

The exported program keeps high-level ops (``run_decompositions({})`` only functionalizes),
so ``linear``, ``layer_norm``, ``scaled_dot_product_attention`` and ``lstm`` arrive whole.
When the exported graph is already functional and every op in it has a converter, the
decomposition step is skipped (``export_program``): it is a large share of a cold compile
(``python -m kiln.bench.compile_time`` shows the cold compile time per model), and changes
only the spelling of a few ops there (``batch_norm``, ``reshape``, ``to``, ``dropout``). An import that
needs a fallback redoes the conversion from the decomposed program (``from_exported``).
ATen ops without a converter (``aten_converters.py``) become FALLBACK nodes that run the
ATen op eagerly; they are listed by ``kiln.explain`` with the reason.
"""
from __future__ import annotations

from dataclasses import field
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind

from kiln.errors import KilnError
from kiln.ir import DType, Graph, OpKind, TensorType, Value
from kiln.ir import attrs as A
from kiln.ir.types import symbolic_dim
from kiln.ir.record import record

from .aten_converters import CONVERTERS
from .common import FrontendBuilder
from .hf_outputs import register_output_pytrees
from .torch_rnn import rnn_leaf_ops


@record(frozen=False, slots=False)
class TorchImport:
    graph: Graph
    in_spec: Any  # pytree spec of (args, kwargs)
    out_spec: Any  # pytree spec of the model's outputs
    out_literals: dict[int, Any]  # flat output position -> non-tensor output value
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)  # (op, scope, reason)
    implied_max: dict = field(default_factory=dict)  # size name -> the largest value the graph serves


# ----------------------------------------------------------------------------- the importer
def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "")


def _tensor_type(t: torch.Tensor, dims: "SymbolicDims | None" = None) -> TensorType:
    return TensorType(DType.from_torch(t.dtype), tuple(_dim(s, dims) for s in t.shape))


class SymbolicDims:
    """torch.export's size symbols (``s43``) under the names the user gave them (``batch``)."""

    def __init__(self):
        self.names: dict[str, str] = {}  # torch symbol -> Kiln name

    def dim(self, x):
        import sympy

        expr = x.node.expr
        if expr.is_Integer:
            return int(expr)
        unknown = [str(s) for s in expr.free_symbols if str(s) not in self.names]
        if unknown:
            raise KilnError(f"torch.export made a size dynamic that no dynamic= entry names ({', '.join(unknown)})")
        return symbolic_dim(str(expr.subs({s: sympy.Symbol(self.names[str(s)]) for s in expr.free_symbols})))


def _dim(x, dims: "SymbolicDims | None"):
    """An IR dim for a torch size: an int, or a symbolic dim named as the user named it."""
    if isinstance(x, torch.SymInt):
        if dims is None:
            raise KilnError("a symbolic size in a program exported without dynamic dims")
        return dims.dim(x)
    return int(x)


def _template(a, ins: list, env_lookup):
    """Argument template for a FALLBACK node: tensors become ("$", i) references."""
    if isinstance(a, fx.Node):
        v = env_lookup(a)
        if not isinstance(v, Value):
            raise TypeError(f"non-tensor operand {a}")
        ins.append(v)
        return ("$", len(ins) - 1)
    if isinstance(a, (list, tuple)):
        items = tuple(_template(x, ins, env_lookup) for x in a)
        return ("$list", items) if isinstance(a, list) else items
    if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                   torch.layout)):
        return a
    raise TypeError(f"unsupported literal {type(a).__name__}")


def export_program(model, args: tuple, kwargs: dict | None = None, dynamic_shapes=None):
    """``torch.export`` the model; decomposed (functionalized) unless it is importable as is.
    ``dynamic_shapes`` is torch.export's (``torch.export.Dim``s for the dims that vary)."""
    register_output_pytrees(model)  # a decoder's DynamicCache output (frontends/hf_outputs.py)
    with torch.no_grad(), rnn_leaf_ops():
        ep = torch.export.export(model, tuple(args), kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)
    if importable_as_exported(ep):
        ep._kiln_undecomposed = True  # from_exported decomposes it after all if a fallback is needed
        return ep
    return ep.run_decompositions({})


def importable_as_exported(ep) -> bool:
    """Whether ``ep`` converts without ``run_decompositions``: nothing mutates (no in-place or
    out= op, no buffer or input mutation), and every call is an ATen op with a converter
    (higher-order ops such as a ``no_grad`` region, and Python functions, need the
    decomposition to inline them)."""
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        return False
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if isinstance(node.meta.get("val"), torch.SymInt):
            continue  # size arithmetic of a dynamic program (sym_size, mul): the conversion reads its value
        t = node.target
        if not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable or CONVERTERS.lookup(t) is None:
            return False
    return True


def from_exported(ep, name: str = "model", dims: dict | None = None, size_max: dict | None = None) -> TorchImport:
    """``dims``: (user input position, axis) -> the name of a size that varies per call (the
    program was exported with those dims dynamic); they become symbolic dims in the IR.
    ``size_max``: each such size's largest value (None: unbounded)."""
    imp = _convert(ep, name, dims, size_max)
    if imp.fallbacks and getattr(ep, "_kiln_undecomposed", False):
        # a converter declined an op of the undecomposed program: the decomposed spelling
        # may be covered (and if not, its fallbacks are the ones to report)
        ep = ep.run_decompositions({})
        imp = _convert(ep, name, dims, size_max)
    if imp.fallbacks:
        imp = _with_core_decompositions(ep, name, imp, dims, size_max)
    return imp


def _with_core_decompositions(ep, name: str, imp: TorchImport, dims=None, size_max=None) -> TorchImport:
    """Ops that still fall back and that PyTorch decomposes into its Core ATen opset
    (``torch._decomp.core_aten_decompositions``): decompose just those and convert again,
    keeping the result if fewer ops fall back."""
    from torch._decomp import core_aten_decompositions

    names = {op for op, _, _ in imp.fallbacks}
    table = {op: fn for op, fn in core_aten_decompositions().items() if str(op) in names}
    if not table:
        return imp
    try:
        again = _convert(ep.run_decompositions(table), name, dims, size_max)
    except Exception:  # noqa: BLE001  (a decomposition torch cannot run here: keep the fallbacks)
        return imp
    return again if len(again.fallbacks) < len(imp.fallbacks) else imp


def _convert(ep, name: str, dims: dict | None = None, size_max: dict | None = None) -> TorchImport:
    cx = FrontendBuilder(name)
    symbols = SymbolicDims() if dims else None
    cx.symbols = symbols
    cx.size_max = dict(size_max or {})
    sig = ep.graph_signature
    env: dict[fx.Node, Any] = {}
    state = dict(ep.state_dict)
    consts = dict(getattr(ep, "constants", {}) or {})
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    fallbacks: list[tuple[str, str, str]] = []
    user = 0
    shared: dict[tuple, Value] = {}
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind is InputKind.USER_INPUT:
            val = node.meta.get("val")
            position, user = user, user + 1
            if not isinstance(val, torch.Tensor):
                env[node] = val  # a non-tensor input is specialized to its example value
                continue
            for axis, d in enumerate(val.shape):
                want = (dims or {}).get((position, axis))
                if want is None:
                    continue
                if not isinstance(d, torch.SymInt) or not d.node.expr.is_Symbol:
                    raise KilnError(f"input {spec.arg.name!r} dim {axis} ({want}) cannot vary: the model fixes "
                                    f"it to {d}")
                if symbols.names.setdefault(str(d.node.expr), want) != want:
                    raise KilnError(f"input {spec.arg.name!r} dim {axis} is named {want} but the model makes it "
                                    f"the same size as {symbols.names[str(d.node.expr)]}")
            env[node] = cx.input(spec.arg.name, _tensor_type(val, symbols).shape, DType.from_torch(val.dtype))
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            t = state[spec.target] if spec.target in state else consts[spec.target]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"unsupported constant {spec.target}")
            t = t.detach()
            label = spec.target
            ident = (t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if t.numel() and ident in shared:  # one tensor under several names (tied weights): one constant
                env[node] = shared[ident]
                continue
            # integer buffers (position ids, token type ids) are literals; float ones are weights
            env[node] = cx.literal(t, label) if not t.is_floating_point() else cx.weight(t, label)
            shared[ident] = env[node]
        else:
            raise TypeError(f"unsupported graph input kind {spec.kind}")

    def lookup(a):
        return env[a]

    def map_arg(a):
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(map_arg(x) for x in a)
        return a

    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        cx.scope = _scope(node)
        if node.target is operator.getitem:
            src, i = env[node.args[0]], node.args[1]
            env[node] = src[i]
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):  # size arithmetic (sym_size, mul, floordiv): a dim
            env[node] = _dim(val, symbols)
            continue
        args, kwargs = map_arg(node.args), {k: map_arg(v) for k, v in node.kwargs.items()}
        fn = CONVERTERS.lookup(node.target)
        out, reason = None, f"no Kiln converter for {node.target}"
        if fn is not None and _complex_values(node, args, kwargs):
            fn, reason = None, "complex values: no Kiln op computes on them"
        if fn is not None:
            out = fn(cx, list(args), kwargs, node)
            if out is None:
                reason = f"Kiln's {node.target.overloadpacket} converter does not cover these arguments"
        if out is None:
            out = fold_literal_call(cx, node, lookup)  # an op on literals only: evaluated now
        if out is None:
            out = _fallback(cx, node, lookup, reason)
            fallbacks.append((str(node.target), cx.scope, reason))
        _check(node, out, symbols)
        env[node] = out

    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    flat_outs = list(out_node.args[0])
    user = [i for i, s in enumerate(sig.output_specs) if s.kind is OutputKind.USER_OUTPUT]
    outputs, literals = [], {}
    for pos, i in enumerate(user):
        a = flat_outs[i]
        v = env[a] if isinstance(a, fx.Node) else a
        if isinstance(v, Value):
            outputs.append(v)
        else:
            literals[pos] = v
    graph = cx.finish(outputs)
    return TorchImport(graph, ep.call_spec.in_spec, ep.call_spec.out_spec, literals, fallbacks, dict(cx.implied_max))


def _complex_values(node: fx.Node, args, kwargs) -> bool:
    """Whether a node reads or makes complex values (they run in PyTorch, as FALLBACKs)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    if any(isinstance(v, torch.Tensor) and v.is_complex() for v in vals):
        return True
    leaves = list(args) + list(kwargs.values())
    while leaves:
        a = leaves.pop()
        if isinstance(a, (list, tuple)):
            leaves.extend(a)
        elif isinstance(a, Value) and a.dtype.is_complex:
            return True
    return False


def _fallback(cx: FrontendBuilder, node: fx.Node, lookup, reason: str):
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    val = node.meta.get("val")
    vals = list(val) if isinstance(val, (list, tuple)) else [val]
    if not all(isinstance(v, torch.Tensor) or v is None for v in vals):
        raise KilnError(f"{node.target} returns a Python value computed from tensor data "
                        f"({', '.join(type(v).__name__ for v in vals)}); Kiln compiles graphs of tensors only")
    if any(isinstance(v, torch.Tensor) and free_unbacked_symbols(v) for v in vals):
        shapes = [list(v.shape) for v in vals if isinstance(v, torch.Tensor)]
        raise KilnError(f"{node.target} gives a tensor whose shape depends on the data {shapes}; "
                        f"Kiln compiles graphs whose shapes are known from the inputs' shapes")
    ins: list[Value] = []
    args = _template(tuple(node.args), ins, lookup)
    kwargs = tuple((k, _template(v, ins, lookup)) for k, v in node.kwargs.items())
    types = tuple(_tensor_type(v, cx.symbols) for v in vals if isinstance(v, torch.Tensor))
    attrs = A.FallbackAttrs(str(node.target), args, kwargs, types, reason)
    outs = cx.add(OpKind.FALLBACK, *ins, attrs=attrs, name=node.name)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if not isinstance(val, (list, tuple)):
        return outs[0]
    it = iter(outs)
    return tuple(next(it) if isinstance(v, torch.Tensor) else None for v in vals)


def fold_literal_call(cx: FrontendBuilder, node: fx.Node, lookup):
    """Run an ATen op without a converter whose tensor operands are all literals (index
    tables built with meshgrid and index assignments, masks) at import time, as the
    builder folds converted ops; its results are literals. Ops that mutate, draw random
    numbers or take no tensor at all are left alone. None when it does not apply."""
    t = node.target
    if not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable or \
            torch.Tag.nondeterministic_seeded in t.tags:
        return None
    ins: list[Value] = []
    try:
        args = _template(tuple(node.args), ins, lookup)
        kwargs = {k: _template(v, ins, lookup) for k, v in node.kwargs.items()}
    except TypeError:
        return None
    if not ins or not all(v in cx.literals for v in ins):
        return None
    tensors = [cx.literals[v] for v in ins]

    def fill(a):
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "$":
            return tensors[a[1]]
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "$list":
            return [fill(x) for x in a[1]]
        if isinstance(a, tuple):
            return tuple(fill(x) for x in a)
        return a

    try:
        with torch.no_grad():
            r = t(*fill(args), **{k: fill(v) for k, v in kwargs.items()})
    except Exception:  # noqa: BLE001  (it runs as a fallback instead, and fails there if it must)
        return None
    if isinstance(r, torch.Tensor):
        return cx.literal(r.contiguous())
    if isinstance(r, (list, tuple)) and all(isinstance(x, torch.Tensor) for x in r):
        return tuple(cx.literal(x.contiguous()) for x in r)
    return None


def _check(node: fx.Node, out, symbols=None):
    """The converted value must have the type torch.export recorded (a converter bug otherwise)."""
    val = node.meta.get("val")
    outs = out if isinstance(out, tuple) else (out,)
    vals = val if isinstance(val, (list, tuple)) else (val,)
    for o, v in zip(outs, vals):
        if isinstance(o, Value) and isinstance(v, torch.Tensor):
            want = _tensor_type(v, symbols)
            if (o.type.dtype, o.type.shape) != (want.dtype, want.shape):
                if o.type.dtype == want.dtype and not (o.type.is_static and want.is_static):
                    # size arithmetic Kiln cannot prove equal to torch's for every size in range
                    # (a reshape that only works for even lengths): the dim cannot vary here
                    raise KilnError(f"{node.target} makes a varying size {want.shape} where Kiln derives "
                                    f"{o.type.shape}: the model constrains the dims it was asked to vary "
                                    f"(compile without dynamic= for them)")
                raise AssertionError(f"converter for {node.target} produced {o.type!r}, torch says {want!r}")

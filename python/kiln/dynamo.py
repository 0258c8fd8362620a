"""``torch.compile(model, backend="kiln")``: Kiln as a TorchDynamo backend.

Dynamo hands over each captured FX graph; Kiln compiles it on its first call with the
real inputs (``torch.export`` re-traces the FX module), and recompiles per input shape.

Dynamo lifts a module's parameters and buffers into graph inputs (it marks them: they are
``nn.Parameter`` objects or carry ``_dynamo_static_input_type``). Kiln compiles them as what
they are — weights, folded and prepacked once, as ``kiln.compile`` does — rather than as
activations arriving on every call. Each call checks that the same tensors arrive, unchanged
(same object, same in-place version counter); when one differs (a new state dict, an
in-place update) the graph is compiled again with the new values, never run with stale ones.

With ``dynamic=True`` (or once Dynamo marks a size dynamic after seeing it change), the graph's
example values carry symbolic sizes (``s77``) and Dynamo passes each size as an extra
``SymInt`` input. Kiln compiles one plan with those dims dynamic (named by Dynamo's symbols)
and reads each size input off the tensor dim it stands for, so every size Dynamo's guards let
through runs on that plan. Sizes Kiln cannot tie to an input dim (an expression, a size of
no input) keep the per-shape compile.
"""
from __future__ import annotations

import warnings

import torch

from .errors import KilnError, KilnWarning


def _is_weight(x) -> bool:
    return isinstance(x, torch.Tensor) and (isinstance(x, torch.nn.Parameter) or
                                           getattr(x, "_dynamo_static_input_type", None) is not None)


class _Frozen(torch.nn.Module):
    """The FX graph with its lifted weights held as buffers, so the export sees constants, and
    its size inputs read off the tensor dims they stand for (``sizes``: graph input -> (graph
    input of the tensor, axis))."""

    def __init__(self, gm, example_inputs, weights: list[int], sizes: dict | None = None):
        super().__init__()
        self.gm = gm
        self.n = len(example_inputs)
        self.slots = weights
        self.sizes = dict(sizes or {})
        for j, i in enumerate(weights):
            self.register_buffer(f"w{j}", example_inputs[i].detach())

    def forward(self, *live):
        it, args = iter(live), []
        slot = {i: j for j, i in enumerate(self.slots)}
        for i in range(self.n):
            args.append(getattr(self, f"w{slot[i]}") if i in slot else None if i in self.sizes else next(it))
        for i, (t, axis) in self.sizes.items():
            args[i] = args[t].shape[axis]
        return self.gm(*args)


def _inline_scalars(gm, values: dict):
    """A copy of ``gm`` with each ``placeholder.item()`` of the placeholders in ``values``
    (position -> Python number) replaced by the number itself (torch.export would trace
    ``.item()`` of a tensor as a size it cannot know)."""
    import copy

    graph = copy.deepcopy(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for i, value in values.items():
        for item in list(placeholders[i].users):
            for user in list(item.users):
                user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is item else a)
                user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is item else a)
            graph.erase_node(item)
    return torch.fx.GraphModule(gm, graph)


def _symbolic_sizes(gm, example_inputs, skip: set):
    """(size inputs -> (tensor input, axis), the DynamicDims of the live tensors) when every
    symbolic size Dynamo hands over is a dim of an input tensor; None otherwise (or when there
    is none)."""
    from .options import DynamicDim

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    where, dims, position = {}, [], 0
    for i, (node, x) in enumerate(zip(placeholders, example_inputs)):
        if i in skip or isinstance(x, torch.SymInt):
            continue
        if not isinstance(x, torch.Tensor):
            position += 1  # (a non-tensor input other than a size: compiled as a value)
            continue
        val = node.meta.get("example_value")
        for axis, d in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if isinstance(d, torch.SymInt) and not d.node.expr.is_Integer:
                if not d.node.expr.is_Symbol:
                    return None
                name = str(d.node.expr)
                where.setdefault(name, (i, axis))
                dims.append(DynamicDim(position, axis, name))
        position += 1
    sizes = {}
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.SymInt):
            if not x.node.expr.is_Symbol or str(x.node.expr) not in where:
                return None
            sizes[i] = where[str(x.node.expr)]
    return (sizes, tuple(dims)) if dims else None


def kiln_backend(gm, example_inputs, options=None):
    """``torch.compile(..., options={...})`` hands its options dict over as ``options``: the
    same keywords as ``kiln.compile`` (or a ``kiln.CompileOptions``)."""
    from .api import CompiledModel
    from .options import CompileOptions

    parsed = options if isinstance(options, CompileOptions) or options is None \
        else CompileOptions.parse(**dict(options))
    weights = [i for i, x in enumerate(example_inputs) if _is_weight(x)]
    # Python floats Dynamo passes as 0-d tensors (it does under dynamic=True: a layer norm's eps,
    # an attention scale) are compiled in as constants, and checked by value on every call
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    scalars = [i for i, (n, x) in enumerate(zip(placeholders, example_inputs))
               if i not in set(weights) and isinstance(x, torch.Tensor) and x.dim() == 0
               and getattr(n.meta.get("grapharg"), "pass_arg_as_tensor", False) and n.users
               and all(u.op == "call_method" and u.target == "item" for u in n.users)] \
        if len(placeholders) == len(example_inputs) else []
    frozen = sorted(weights + scalars)
    symbolic = _symbolic_sizes(gm, example_inputs, set(frozen)) \
        if parsed is None or parsed.dynamic is not False else None
    sizes = symbolic[0] if symbolic else {}
    if symbolic:  # one plan for every size Dynamo's guards admit
        parsed = (parsed or CompileOptions.parse()).replace(dynamic=symbolic[1])
    live = [i for i in range(len(example_inputs)) if i not in set(frozen) and i not in sizes]
    static = parsed.replace(dynamic=None) if symbolic else parsed
    state = {"dynamic": bool(symbolic)}

    def build(inputs):
        state["seen"] = [(inputs[i], inputs[i]._version) for i in weights]
        state["values"] = [inputs[i].item() for i in scalars]
        graph = _inline_scalars(gm, dict(zip(scalars, state["values"]))) if scalars else gm
        module = _Frozen(graph, inputs, frozen, sizes) if frozen or sizes else graph
        state["compiled"] = CompiledModel(module, name="dynamo_graph",
                                          options=parsed if state["dynamic"] else static)
        run.kiln = state["compiled"]

    def run(*args):
        if any(args[i] is not t or t._version != v for i, (t, v) in zip(weights, state["seen"])) or \
                any(args[i].item() != v for i, v in zip(scalars, state["values"])):
            build(args)  # different or updated weights or scalars: compile with them
        try:
            return state["compiled"](*[args[i] for i in live])
        except KilnError as e:
            if not state["dynamic"] or state["compiled"].compiled:
                raise
            # the dims Dynamo made dynamic do not stay symbolic through torch.export and Kiln:
            # compile per shape, as without dynamic=
            warnings.warn(f"torch.compile(backend='kiln'): the graph's symbolic sizes cannot stay symbolic "
                          f"({e}); compiling a plan per input shape instead", KilnWarning, stacklevel=2)
            state["dynamic"] = False
            build(args)
            return state["compiled"](*[args[i] for i in live])

    build(list(example_inputs))
    return run


def register() -> None:
    """Register the backend by name (also done through the package's entry point)."""
    from torch._dynamo import list_backends, register_backend

    if "kiln" not in list_backends(exclude_tags=()):
        register_backend(name="kiln")(kiln_backend)

"""``dynamic=``: which input dims vary per call, as torch.export and the guards need them.

``CompileOptions.dynamic`` says it in the user's terms (``True``, or input name/position ->
axis -> size name and range). Here that becomes, for one model and its example inputs:
the dims (flat input position, axis, size name, range), torch.export's ``dynamic_shapes``,
example inputs fit for tracing (torch.export fixes a size of 1 as a constant, so such an
example dim is widened to 2 by repeating its data), and each size's example value (the
hint kernels are chosen at).
"""
from __future__ import annotations

import inspect

import torch
import torch.utils._pytree as pytree

from .errors import KilnError
from .options import DynamicDim
from kiln.ir.record import record


@record(slots=False)
class VaryingDim:
    """One input dim that varies between calls: where it is, its name and range."""
    position: int  # among the model's flat tensor inputs
    input: str  # the input's name (for messages)
    axis: int
    name: str
    min: int
    max: int | None

    def range_text(self) -> str:
        return f"[{self.min}, {'inf' if self.max is None else self.max}]"


@record(slots=False)
class DynamicSpec:
    """Every varying dim of a model's inputs, and the sizes kernels are chosen at."""
    dims: tuple[VaryingDim, ...]
    hints: dict  # size name -> its example value

    def limited(self, limits: dict) -> "DynamicSpec":
        """This spec with the sizes in ``limits`` (name -> (min, max), None: unchanged) narrowed."""
        from dataclasses import replace

        dims = []
        for d in self.dims:
            lo, hi = limits.get(d.name, (None, None))
            if lo is not None:
                d = replace(d, min=max(d.min, lo) if lo > 2 else d.min)  # sizes 1 and 2 are served all the same
            if hi is not None:
                d = replace(d, max=hi if d.max is None else min(d.max, hi))
            dims.append(d)
        return DynamicSpec(tuple(dims), self.hints)

    def by_position(self) -> dict:
        """(flat input position, axis) -> size name."""
        return {(d.position, d.axis): d.name for d in self.dims}

    def check(self, leaves) -> dict:
        """The sizes of this call, after checking each against its range and every dim of one
        name against the others; raises KilnError naming the input, the dim and the range."""
        sizes: dict = {}
        where: dict = {}
        for d in self.dims:
            x = leaves[d.position]
            n = x.shape[d.axis]
            if n < d.min or (d.max is not None and n > d.max):
                raise KilnError(f"input {d.input!r} dim {d.axis} ({d.name}) is {n}, outside the compiled range "
                                f"{d.range_text()}")
            if sizes.setdefault(d.name, n) != n:
                raise KilnError(f"input {d.input!r} dim {d.axis} ({d.name}) is {n} but {where[d.name]} gives "
                                f"{d.name} = {sizes[d.name]}")
            where.setdefault(d.name, f"input {d.input!r} dim {d.axis}")
        return sizes


def _params(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, object]]:
    """(name, value) of each argument as the forward binds it (positional first)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return [(f"input{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    out = []
    for name, value in bound.arguments.items():
        kind = inspect.signature(module.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out += list(value.items())
        else:
            out.append((name, value))
    return out


def resolve(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic) -> DynamicSpec:
    """The varying dims of ``module`` called with ``args``/``kwargs`` under ``dynamic``."""
    params = _params(module, args, kwargs)
    leaves = pytree.tree_leaves((args, kwargs))
    position = {id(v): i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)}
    if dynamic is True:
        wanted = []
        for name, v in params:
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                wanted.append(DynamicDim(name, 0, "batch"))
                if v.dim() == 2 and not v.is_floating_point():  # token ids and their masks
                    wanted.append(DynamicDim(name, 1, "seq"))
    else:
        wanted = list(dynamic)
    dims = []
    names = [n for n, _ in params]
    for d in wanted:
        if isinstance(d.input, int):
            if not 0 <= d.input < len(args):
                raise KilnError(f"dynamic: input position {d.input} is out of range ({len(args)} positional inputs)")
            label, value = params[d.input] if d.input < len(params) else (f"input{d.input}", args[d.input])
        else:
            hit = [v for n, v in params if n == d.input]
            if not hit:
                raise KilnError(f"dynamic: no input named {d.input!r}; the inputs are {', '.join(names)}")
            label, value = d.input, hit[0]
        if not isinstance(value, torch.Tensor) or id(value) not in position:
            raise KilnError(f"dynamic: input {label!r} is not a tensor the model takes directly")
        if d.axis >= value.dim():
            raise KilnError(f"dynamic: input {label!r} has {value.dim()} dims, no axis {d.axis}")
        dims.append(VaryingDim(position[id(value)], label, d.axis, d.name, d.min, d.max))
    return _with_hints(dims, leaves)


def export_arguments(module: torch.nn.Module, args: tuple, kwargs: dict, spec: DynamicSpec):
    """(args, kwargs, dynamic_shapes) for torch.export: each varying dim a
    ``torch.export.Dim.AUTO`` with its range, and example dims of size 1 widened to 2 (torch.export would fix
    them as constants) by repeating the data along them."""
    from torch.export import Dim

    leaves, tree = pytree.tree_flatten((args, kwargs))
    # the sizes of these arguments, not the compile's example: a specialization compiled later
    # (another static dim) traces on the call that needed it, which may have a batch of 1
    small = {d.name for d in spec.dims if leaves[d.position].shape[d.axis] < 2}
    widen = {n for n in small if all(d.max is None or d.max >= 2 for d in spec.dims if d.name == n)}
    fixed = small - widen
    if fixed:
        raise KilnError(f"dynamic: {', '.join(sorted(fixed))} can only be 1: nothing varies")
    torch_dims = {}
    for d in spec.dims:
        if d.name not in torch_dims:
            lo = max(d.min, 2)  # torch.export fixes sizes 0 and 1; a call of size 1 is still served
            # Dim.AUTO, not a named Dim: torch.export infers the model's own bounds (a position
            # table of 512 rows) and ties in one trace, where a named Dim fails on them and
            # needs a second trace with the suggested fixes. What it inferred is checked after
            # the trace (exported_limits; a dim the model fixes is refused when converting).
            torch_dims[d.name] = Dim.AUTO(min=lo, max=d.max) if d.max is not None else Dim.AUTO(min=lo)
    per_leaf: dict = {}
    for d in spec.dims:
        per_leaf.setdefault(d.position, {})[d.axis] = d
    for pos, axes in per_leaf.items():
        x = leaves[pos]
        for axis, d in axes.items():
            if d.name in widen:
                x = x.index_select(axis, torch.arange(2) % x.shape[axis])
        leaves[pos] = x
    args2, kwargs2 = pytree.tree_unflatten(leaves, tree)
    # torch.export's dynamic_shapes mirror (args, kwargs): a {axis: Dim} for each varying tensor
    shapes = [None if not isinstance(x, torch.Tensor) or i not in per_leaf else
              {axis: torch_dims[d.name] for axis, d in per_leaf[i].items()} for i, x in enumerate(leaves)]
    dyn_args, dyn_kwargs = pytree.tree_unflatten(shapes, tree)
    if dyn_kwargs:
        names = [n for n, _ in _params(module, args, kwargs)]
        dynamic_shapes = dict(zip(names, list(dyn_args) + list(dyn_kwargs.values())))
    else:
        dynamic_shapes = tuple(dyn_args)
        params = inspect.signature(module.forward).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
            # torch.export matches dynamic_shapes to the signature: *args is one entry
            named = sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                        for p in params)
            dynamic_shapes = dynamic_shapes[:named] + (dynamic_shapes[named:],)
    return tuple(args2), dict(kwargs2), dynamic_shapes


def exported_limits(ep, spec: DynamicSpec) -> dict:
    """Size name -> (min, max) as torch.export inferred them for the varying dims (max None:
    unbounded); the model narrows a range the user left open, e.g. to its position table."""
    from torch.export.graph_signature import InputKind

    users = [n for n, s in zip((n for n in ep.graph.nodes if n.op == "placeholder"), ep.graph_signature.input_specs)
             if s.kind is InputKind.USER_INPUT]
    out: dict = {}
    for d in spec.dims:
        val = users[d.position].meta.get("val") if d.position < len(users) else None
        size = val.shape[d.axis] if isinstance(val, torch.Tensor) and d.axis < val.dim() else None
        if not isinstance(size, torch.SymInt) or not size.node.expr.is_Symbol:
            continue  # fixed by the model: the conversion refuses it, naming the input
        vr = ep.range_constraints.get(size.node.expr)
        if vr is None:
            continue
        lo, hi = _finite(vr.lower), _finite(vr.upper)
        was_lo, was_hi = out.get(d.name, (None, None))
        lo = lo if was_lo is None else max(lo or was_lo, was_lo)
        hi = hi if was_hi is None else (was_hi if hi is None else min(hi, was_hi))
        out[d.name] = (lo, hi)
    return out


def _finite(bound) -> int | None:
    """A range bound as an int; None for torch's infinities (and its 2**63 stand-ins)."""
    if not getattr(bound, "is_integer", False) or getattr(bound, "is_finite", True) is False:
        return None
    try:
        n = int(bound)
    except (TypeError, ValueError, AttributeError):
        return None
    return n if abs(n) < 2 ** 62 else None


def _size_name(text, fallback: str) -> str:
    """A dim_param as a size name: a plain identifier that sympy reads as a symbol (``N`` or
    ``E`` are sympy's own names), else ``fallback``."""
    import sympy

    if isinstance(text, str) and text.isidentifier():
        try:
            if isinstance(sympy.sympify(text), sympy.Symbol):
                return text
        except Exception:  # noqa: BLE001  (any text sympy cannot read: use the fallback)
            pass
        return f"d_{text}"
    return fallback


def resolve_onnx(signature: list, leaves: list, dynamic, fixed_values: set) -> DynamicSpec | None:
    """The varying dims of an ONNX model (``signature``: (name, dtype, dims) per input, a
    dim a ``dim_param`` string or ``"?"`` when unknown) called with ``leaves``. ``dynamic``
    None or True: every dim the model leaves symbolic (named by its dim_param); the dict
    form: those dims by input name or position. ``fixed_values``: inputs whose values the
    plan is specialized to (their dims stay exact). None: nothing varies."""
    names = [n for n, _, _ in signature]
    if dynamic is None or dynamic is True:
        wanted = []
        for i, (name, _, dims) in enumerate(signature):
            if i in fixed_values:
                continue
            for axis, d in enumerate(dims):
                if isinstance(d, str) or d == 0:
                    wanted.append(DynamicDim(i, axis, _size_name(d if d != "?" else None, f"{name}_dim{axis}")))
        if not wanted:
            if dynamic is True:
                raise KilnError("dynamic=True: the ONNX model gives every input dim a fixed size (no dim_param); "
                                "name the dims that vary with the dict form, e.g. {'input': {0: 'batch'}}")
            return None
    else:
        wanted = list(dynamic)
    dims = []
    for d in wanted:
        if isinstance(d.input, int):
            if not 0 <= d.input < len(signature):
                raise KilnError(f"dynamic: input position {d.input} is out of range ({len(signature)} inputs)")
            i = d.input
        elif d.input in names:
            i = names.index(d.input)
        else:
            raise KilnError(f"dynamic: no input named {d.input!r}; the inputs are {', '.join(names)}")
        name, _, shape = signature[i]
        if d.axis >= len(shape):
            raise KilnError(f"dynamic: input {name!r} has {len(shape)} dims, no axis {d.axis}")
        if isinstance(shape[d.axis], int) and shape[d.axis] > 0:
            raise KilnError(f"dynamic: input {name!r} dim {d.axis} ({d.name}) cannot vary: the model fixes it to "
                            f"{shape[d.axis]}")
        if i in fixed_values:
            raise KilnError(f"dynamic: input {name!r} feeds a shape operand (its values are compiled in): its dims "
                            f"cannot vary per call")
        dims.append(VaryingDim(i, name, d.axis, d.name, d.min, d.max))
    return _with_hints(dims, leaves)


def _with_hints(dims: list, leaves) -> DynamicSpec:
    """The spec of ``dims`` with each size's example value (the hint kernels are chosen at),
    checked: given as a tensor, the axis exists, one size per name, inside its range."""
    hints = {}
    for d in dims:
        if d.position >= len(leaves) or not isinstance(leaves[d.position], torch.Tensor):
            raise KilnError(f"dynamic: input {d.input!r} is not given as a tensor")
        n = leaves[d.position].shape[d.axis] if d.axis < leaves[d.position].dim() else None
        if n is None:
            raise KilnError(f"dynamic: input {d.input!r} has no axis {d.axis}")
        if hints.setdefault(d.name, n) != n:
            raise KilnError(f"dynamic: the example inputs give {d.name} two sizes ({hints[d.name]} and {n})")
        if n < d.min or (d.max is not None and n > d.max):
            raise KilnError(f"dynamic: the example input {d.input!r} dim {d.axis} is {n}, outside {d.name}'s "
                            f"range {d.range_text()}")
    return DynamicSpec(tuple(dims), hints)

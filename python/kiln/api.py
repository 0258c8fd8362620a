"""``kiln.compile`` and ``kiln.explain``: the public entry points."""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import KilnError
from .target import Target


@dataclass
class InputSpec:
    name: str
    dtype: torch.dtype | None  # None for a non-tensor input (specialized by value)
    shape: tuple
    device: str
    value: Any = None


@dataclass
class Compiled:
    """One specialization: a plan for one set of input shapes."""

    plan: Any
    graph: Any
    out_spec: Any
    out_literals: dict
    fallbacks: list
    input_names: list[str]
    report: Any = None  # runtime.compile.CompileFacts: partition, pass records, cache hit, sparsity


class _FnModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _is_onnx(model) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return True
    try:
        import onnx
    except ImportError:
        return False
    return isinstance(model, onnx.ModelProto)


def _leaf_spec(name: str, x) -> InputSpec:
    if isinstance(x, torch.Tensor):
        return InputSpec(name, x.dtype, tuple(x.shape), x.device.type)
    return InputSpec(name, None, (), "", x)


class CompiledModel:
    """What ``kiln.compile`` returns: call it like the original model.

    Each distinct set of input shapes gets its own plan (compiled on first use), so a new
    batch size or sequence length recompiles instead of returning a wrong answer. Calls
    with the wrong number of inputs, a wrong dtype, rank or device raise ``KilnError``.
    """

    def __init__(self, model, example_inputs=None, example_kwargs=None, *, target: "str | Target | None" = None,
                 name: str | None = None, **options):
        self._infer_target = target is None  # CUDA inputs (examples or the first call's) mean cuda
        if target is None:
            leaves = pytree.tree_leaves((example_inputs, example_kwargs))
            target = "cuda" if any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves) else "cpu"
        self.target_spec = Target.parse(target)
        self.source = model
        self.target = self.target_spec.kind
        self._threads = _threads_option(options.pop("threads", None))
        self.options = _quantize_options(options)
        self.is_onnx = _is_onnx(model)
        self.name = name or (type(model).__name__ if not self.is_onnx else "onnx_model")
        self._plans: dict[tuple, Compiled] = {}
        self._lock = threading.Lock()
        self._spec: list[InputSpec] | None = None
        self._value_inputs: set[int] = set()  # inputs whose values the plan is specialized to
        self._in_tree = None
        self._tensor_args: int | None = None  # compiled for this many positional tensors and nothing else
        if self.is_onnx:
            from kiln.frontends.onnx_import import load_onnx

            from kiln.frontends.onnx_import import value_inputs

            self._onnx = load_onnx(model)
            self._value_inputs = value_inputs(self._onnx)
            if example_inputs is not None:
                with _using_threads(self._threads):
                    self._prepare(tuple(example_inputs), {})
        else:
            if isinstance(model, torch.nn.Module):
                self._module = model
            elif callable(model):
                self._module = _FnModule(model)
                self.name = name or getattr(model, "__name__", "function")
            else:
                raise KilnError(f"kiln.compile expects an nn.Module, a function or an ONNX model, "
                                f"got {type(model).__name__}")
            if example_inputs is not None:
                if isinstance(example_inputs, torch.Tensor):
                    example_inputs = (example_inputs,)
                with _using_threads(self._threads):
                    self._prepare(tuple(example_inputs), dict(example_kwargs or {}))
        if not self.is_onnx and not isinstance(model, torch.nn.Module):
            functools.update_wrapper(self, model, updated=())  # a decorated function keeps its name and doc

    # -- compilation ------------------------------------------------------------------
    def _key(self, leaves) -> tuple:
        # kernels are chosen (and oneDNN primitives built) for a thread count: a plan is
        # specialized to torch.get_num_threads() at the call
        key = [("threads", torch.get_num_threads())]
        for i, x in enumerate(leaves):
            if not isinstance(x, torch.Tensor):
                key.append(("v", repr(x)))
            elif i in self._value_inputs:
                key.append((tuple(x.shape), x.dtype, tuple(x.reshape(-1).tolist())))
            else:
                key.append((tuple(x.shape), x.dtype))
        return tuple(key)

    def _prepare(self, args: tuple, kwargs: dict) -> Compiled:
        leaves, tree = pytree.tree_flatten((args, kwargs))
        key = self._key(leaves)
        with self._lock:
            c = self._plans.get(key)
            if c is None:
                c = self._compile(args, kwargs, leaves)
                self._plans[key] = c
                if self._spec is None:
                    self._in_tree = tree
                    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
                        self._tensor_args = len(args)
                    self._spec = [_leaf_spec(n, x) for n, x in zip(c.input_names, leaves)]
        return c

    def _compile(self, args, kwargs, leaves) -> Compiled:
        from kiln.runtime.compile import compile_graph

        if self._infer_target and not self._plans and any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves):
            self.target_spec, self.target = Target.parse("cuda"), "cuda"

        for i, x in enumerate(leaves):
            if self.target != "cuda" and isinstance(x, torch.Tensor) and x.device.type != "cpu":
                raise KilnError(f"input {i} is on {x.device}; the {self.target} target runs on the CPU")
        if self.is_onnx:
            from kiln.frontends.onnx_import import from_onnx

            graph = from_onnx(self._onnx, [x for x in leaves if isinstance(x, torch.Tensor)])
            out_spec, literals, fallbacks = None, {}, []
            names = [v.name for v in graph.inputs]
        else:
            graph, out_spec, literals, fallbacks, names = self._import_torch(args, kwargs, leaves)
        plan, graph, report = compile_graph(graph, target=self.target_spec, **self.options)
        return Compiled(plan, graph, out_spec, literals, fallbacks, names, report)

    def _import_torch(self, args, kwargs, leaves):
        """torch.export + conversion, or a verified entry of the import cache."""
        from kiln.frontends import import_cache
        from kiln.frontends.torch_export import export_program, from_exported
        from kiln.runtime import cache

        key = import_cache.fingerprint(self._module, args, kwargs) if cache.enabled() else None
        hit = import_cache.load(key, self._module, args, kwargs, leaves) if key else None
        if hit is not None:
            return hit
        try:
            ep = export_program(self._module, args, kwargs)
        except KilnError:
            raise
        except Exception as e:
            raise KilnError(f"torch.export could not trace {self.name}: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        imp = from_exported(ep, self.name)
        names = _input_names(ep, leaves)
        if key:
            import_cache.store(key, self._module, imp.graph, imp.out_spec, imp.out_literals, imp.fallbacks, names)
        return imp.graph, imp.out_spec, imp.out_literals, imp.fallbacks, names

    # -- calling ----------------------------------------------------------------------
    def _check(self, leaves, tree):
        """``tree`` None: the caller saw the structure match (positional tensors only)."""
        spec = self._spec
        if (tree is not None and tree != self._in_tree) or len(leaves) != len(spec):
            raise KilnError(f"{self.name} was compiled for {len(spec)} input(s) "
                            f"({', '.join(s.name for s in spec)}); got {len(leaves)}")
        for s, x in zip(spec, leaves):
            if s.dtype is None:
                continue
            if not isinstance(x, torch.Tensor):
                raise KilnError(f"input {s.name!r}: expected a tensor, got {type(x).__name__}")
            if x.dtype != s.dtype:
                raise KilnError(f"input {s.name!r}: expected dtype {s.dtype}, got {x.dtype}")
            if x.dim() != len(s.shape):
                raise KilnError(f"input {s.name!r}: expected rank {len(s.shape)} (shape like {list(s.shape)}), "
                                f"got shape {list(x.shape)}")
            if x.device.type != s.device and self.target != "cuda":  # a cuda plan checks its device
                raise KilnError(f"input {s.name!r}: compiled for device {s.device}, got {x.device}")

    def __call__(self, *args, **kwargs):
        if self._threads is None or self._threads == torch.get_num_threads():
            return self._call(args, kwargs)
        with _using_threads(self._threads):
            return self._call(args, kwargs)

    def _call(self, args, kwargs):
        if not kwargs and len(args) == self._tensor_args and all(isinstance(a, torch.Tensor) for a in args):
            # the common call, positional tensors as compiled: no pytree walk (tens of us)
            leaves, tree = args, None
        else:
            leaves, tree = pytree.tree_flatten((args, kwargs))
        if self._spec is None:
            c = self._prepare(args, kwargs)
        else:
            self._check(leaves, tree)
            c = self._plans.get(self._key(leaves)) or self._prepare(args, kwargs)
        tensors = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in leaves]
        tensors = [x for x in tensors if isinstance(x, torch.Tensor)]
        with torch.no_grad():
            outs = c.plan.run(tensors)
        return self._unflatten(c, outs)

    def _unflatten(self, c: Compiled, outs):
        if c.out_spec is None:  # ONNX: a tuple of outputs, or the one output
            return outs[0] if len(outs) == 1 else tuple(outs)
        flat, it = [], iter(outs)
        for i in range(c.out_spec.num_leaves):
            flat.append(c.out_literals[i] if i in c.out_literals else next(it))
        return pytree.tree_unflatten(flat, c.out_spec)

    # -- introspection ----------------------------------------------------------------
    @property
    def compiled(self) -> list[Compiled]:
        return list(self._plans.values())

    def __repr__(self) -> str:
        return f"<kiln.CompiledModel {self.name} target={self.target} specializations={len(self._plans)}>"


def _threads_option(threads):
    """``threads=N``: the model compiles and runs with N intra-op threads whatever torch's
    setting (None: torch.get_num_threads() at each call, as plans are keyed by it)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise KilnError(f"threads must be a positive int, got {threads!r}")
    return threads


@contextlib.contextmanager
def _using_threads(threads):
    """torch's intra-op thread count set to ``threads`` for the block (it is process-wide:
    torch work on other Python threads sees it meanwhile), then restored."""
    old = torch.get_num_threads()
    if threads is None or threads == old:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _quantize_options(options: dict) -> dict:
    """``quantize="bf16"`` is ``precision="bf16"``; calibration batches become lists of the
    graph's tensor inputs (each batch is a tuple of the model's positional inputs, or one
    tensor)."""
    options = dict(options)
    if options.get("quantize") == "bf16":
        if options.get("precision", "bf16") != "bf16":
            raise KilnError(f"quantize='bf16' conflicts with precision={options['precision']!r}")
        del options["quantize"]
        options["precision"] = "bf16"
    cal = options.get("calibration")
    if cal is not None:
        batches = []
        for item in cal:
            item = (item,) if isinstance(item, torch.Tensor) else tuple(item)
            batches.append([x.contiguous() for x in pytree.tree_leaves(item) if isinstance(x, torch.Tensor)])
        options["calibration"] = batches
    from kiln.runtime.compile import check_quantize_options

    check_quantize_options(options)  # a bad combination fails before tracing the model
    return options


def _input_names(ep, leaves) -> list[str]:
    from torch.export.graph_signature import InputKind

    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind is InputKind.USER_INPUT]
    return names if len(names) == len(leaves) else [f"input{i}" for i in range(len(leaves))]


def compile(model=None, example_inputs=None, example_kwargs=None, **options):
    """Compile a model with Kiln; returns a callable with the model's signature.

    ``model`` is an ``nn.Module``, a function of tensors, an ONNX file path or an
    ``onnx.ModelProto``. Without ``example_inputs`` the model compiles on its first call.
    Also usable as a decorator: ``@kiln.compile`` or ``@kiln.compile(target="cpu")``.
    """
    if model is None:
        return lambda m: CompiledModel(m, example_inputs, example_kwargs, **options)
    return CompiledModel(model, example_inputs, example_kwargs, **options)


@dataclass
class Explanation:
    """What Kiln did with a model: its graph, op counts, and every op that fell back."""

    graph: Any
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)
    kernels: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        g = self.graph
        lines = [f"{g.name}: {len(g.nodes)} nodes, {len(g.constants)} constants "
                 f"({g.num_parameters():,} parameters)", f"fallbacks: {len(self.fallbacks)}"]
        for op, scope, why in self.fallbacks:
            lines.append(f"  {op}" + (f" at {scope}" if scope else "") + f": {why}")
        lines.append("kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels.items())))
        return "\n".join(lines)


def explain(model, example_inputs=None, example_kwargs=None, **options) -> Explanation:
    """Compile ``model`` and report which ops fell back to PyTorch and why."""
    cm = CompiledModel(model, example_inputs, example_kwargs, **options)
    if not cm.compiled:
        raise KilnError("kiln.explain needs example inputs for this model")
    c = cm.compiled[0]
    return Explanation(c.graph, list(c.fallbacks), dict(c.plan.kernel_names))

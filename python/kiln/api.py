"""``kiln.compile`` and ``kiln.explain``: the public entry points."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import warnings
from dataclasses import field
from typing import Any

import torch
import torch.utils._pytree as pytree

from .driver import Compiled
from .errors import KilnError, KilnWarning
from .options import CompileOptions
from kiln.ir.record import record
from .report import CompileReport
from .target import Target


@record(frozen=False, slots=False)
class InputSpec:
    """One positional input of a compiled model: name, dtype, shape, device or a fixed value."""
    name: str
    dtype: torch.dtype | None  # None for a non-tensor input (specialized by value)
    shape: tuple
    device: str
    value: Any = None


class _FnModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _is_onnx(model) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return True
    # a ModelProto exists only once onnx is imported: importing it here to ask (about a second,
    # most of it ml_dtypes) would be most of a warm compile of a torch model
    onnx = sys.modules.get("onnx")
    return onnx is not None and isinstance(model, onnx.ModelProto)


@record(frozen=False, slots=False)
class ModelState:
    """What ``kiln.save`` records of a ``CompiledModel`` and ``kiln.load`` rebuilds it from."""

    name: str
    options: CompileOptions
    is_onnx: bool
    spec: list[InputSpec] | None
    in_tree: Any  # the inputs' pytree structure ((args, kwargs))
    tensor_args: int | None
    value_inputs: set
    plans: list  # (key, Compiled), least recently used first
    dynamic: Any = None  # kiln.dynamic.DynamicSpec of a dynamic= model (its plans' dims are symbolic)


def _axes_of(spec) -> dict:
    """flat input position -> {axis: size name} of a ``DynamicSpec`` (empty for None)."""
    axes: dict = {}
    for d in spec.dims if spec is not None else ():
        axes.setdefault(d.position, {})[d.axis] = d.name
    return axes


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

    def __init__(self, model, example_inputs=None, example_kwargs=None, *, options: CompileOptions | None = None,
                 name: str | None = None, **keywords):
        from . import driver

        self.options = CompileOptions.parse(options, **keywords)
        driver.check_options(self.options)  # a bad option fails here, before tracing the model
        if self.options.target is None:  # CUDA inputs (examples or the first call's) mean cuda
            leaves = pytree.tree_leaves((example_inputs, example_kwargs))
            on_gpu = any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves)
            self._infer_target = True
            self.options = self.options.replace(target=Target.parse("cuda" if on_gpu else "cpu"))
        else:
            self._infer_target = False
        self.source = model
        self.is_onnx = _is_onnx(model)
        self.name = name or (type(model).__name__ if not self.is_onnx else "onnx_model")
        self._plans: dict[tuple, Compiled] = {}  # at most options.max_specializations
        self._last_use: dict[tuple, int] = {}  # key -> call count when its plan last ran
        self._calls = 0
        self._evicted = False
        self._dynamic = None  # dynamic.DynamicSpec once the first inputs are seen (dynamic= only)
        self._dynamic_resolved = False
        self._dynamic_axes: dict = {}  # flat input position -> {axis: size name}
        self._latest: Compiled | None = None
        self._lock = threading.Lock()
        self._spec: list[InputSpec] | None = None
        self._value_inputs: set[int] = set()  # inputs whose values the plan is specialized to
        self._in_tree = None
        self._tensor_args: int | None = None  # compiled for this many positional tensors and nothing else
        self._saved: dict[tuple, Compiled] | None = None  # loaded from an artifact: every plan it holds
        if self.is_onnx:
            from kiln.frontends.onnx_import import load_onnx, value_inputs

            self._onnx = load_onnx(model)
            self._value_inputs = value_inputs(self._onnx)
            if example_inputs is not None:
                with _using_threads(self.options.threads):
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
                with _using_threads(self.options.threads):
                    self._prepare(tuple(example_inputs), dict(example_kwargs or {}))
        if not self.is_onnx and not isinstance(model, torch.nn.Module):
            functools.update_wrapper(self, model, updated=())  # a decorated function keeps its name and doc

    @property
    def target(self) -> str:
        return self.options.resolved_target().kind

    @property
    def report(self) -> CompileReport | None:
        """What the latest compile decided (None before the first compile)."""
        return self._latest.report if self._latest is not None else None

    # -- compilation ------------------------------------------------------------------
    def _key(self, leaves) -> tuple:
        # kernels are chosen (and oneDNN primitives built) for a thread count: a plan is
        # specialized to torch.get_num_threads() at the call
        key = [("threads", torch.get_num_threads())]
        varying = self._dynamic_axes
        for i, x in enumerate(leaves):
            if not isinstance(x, torch.Tensor):
                key.append(("v", repr(x)))
            elif i in self._value_inputs:
                key.append((tuple(x.shape), x.dtype, tuple(x.reshape(-1).tolist())))
            elif i in varying:  # one plan serves every size of a varying dim
                axes = varying[i]
                key.append((tuple(axes.get(a, d) for a, d in enumerate(x.shape)), x.dtype))
            else:
                key.append((tuple(x.shape), x.dtype))
        return tuple(key)

    def _prepare(self, args: tuple, kwargs: dict) -> Compiled:
        leaves, tree = pytree.tree_flatten((args, kwargs))
        if not self._dynamic_resolved and self._saved is None and \
                (self.options.dynamic or (self.is_onnx and self.options.dynamic is None)):
            self._resolve_dynamic(args, kwargs, leaves)
        key = self._key(leaves)
        with self._lock:
            c = self._plans.get(key)
            if c is None:
                c = self._compile(args, kwargs, leaves)
                key = self._key(leaves)  # (an ONNX model that could not stay dynamic compiled static)
                if c.size_limits:  # sizes the import had to bound: calls beyond are refused
                    self._dynamic = self._dynamic.limited(c.size_limits)
                self._plans[key] = c
                self._calls += 1
                self._last_use[key] = self._calls
                self._latest = c
                self._evict()
                if self._spec is None:
                    self._in_tree = tree
                    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
                        self._tensor_args = len(args)
                    self._spec = [_leaf_spec(n, x) for n, x in zip(c.input_names, leaves)]
        return c

    def _evict(self) -> None:
        """Drop least recently used plans beyond ``max_specializations`` (warning once)."""
        while len(self._plans) > self.options.max_specializations:
            victim = min(self._plans, key=self._last_use.__getitem__)
            del self._plans[victim], self._last_use[victim]
            if not self._evicted:
                self._evicted = True
                warnings.warn(f"{self.name} has been called with more than {self.options.max_specializations} "
                              f"input signatures (shapes, dtypes, thread counts); the least recently used plan "
                              f"was dropped and recompiles if its shapes come back. Raise "
                              f"max_specializations= to keep more plans.", KilnWarning, stacklevel=4)
        for k in [k for k in self._last_use if k not in self._plans]:  # a call on another thread
            del self._last_use[k]  # may have touched a plan while it was being dropped

    def _resolve_dynamic(self, args, kwargs, leaves) -> None:
        from . import dynamic

        self._dynamic_resolved = True
        if self.is_onnx:
            from kiln.frontends.onnx_import import input_signature

            spec = dynamic.resolve_onnx(input_signature(self._onnx), list(leaves), self.options.dynamic,
                                        self._value_inputs)
            if spec is None:
                return
        else:
            spec = dynamic.resolve(self._module, args, kwargs, self.options.dynamic)
        self._set_dynamic(spec)

    def _set_dynamic(self, spec) -> None:
        self._dynamic, self._dynamic_axes = spec, _axes_of(spec)

    def _compile(self, args, kwargs, leaves) -> Compiled:
        from . import driver

        if self._saved is not None:
            return self._saved_plan(leaves)
        if self._infer_target and not self._plans and any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves):
            self.options = self.options.replace(target=Target.parse("cuda"))
        for i, x in enumerate(leaves):
            if self.target != "cuda" and isinstance(x, torch.Tensor) and x.device.type != "cpu":
                raise KilnError(f"input {i} is on {x.device}; the {self.target} target runs on the CPU")
            if isinstance(x, torch.Tensor) and x.layout != torch.strided:
                raise KilnError(f"input {i} is a {x.layout} tensor; Kiln compiles dense (strided) tensors")
        if self.is_onnx and self._dynamic is not None and self.options.dynamic is None:
            # dynamic because the model names its dims (dim_param), not because the caller asked:
            # a model whose shape computations cannot stay symbolic compiles per shape instead
            try:
                imp = driver.import_onnx(self._onnx, [x for x in leaves if isinstance(x, torch.Tensor)], self._dynamic)
                return driver.compile_imported(imp, self.options, self.name, self._dynamic.check(leaves))
            except KilnError as e:
                warnings.warn(f"{self.name}: the ONNX model's dim_param dims cannot stay symbolic ({e}); compiling "
                              f"a plan per input shape instead", KilnWarning, stacklevel=4)
                self._set_dynamic(None)
        if self.is_onnx:
            imp = driver.import_onnx(self._onnx, [x for x in leaves if isinstance(x, torch.Tensor)], self._dynamic)
        else:
            imp = driver.import_torch(self._module, args, kwargs, leaves, self.name, self._dynamic)
        return driver.compile_imported(imp, self.options, self.name,
                                       self._dynamic.check(leaves) if self._dynamic else None)

    # -- calling ----------------------------------------------------------------------
    def _check(self, leaves, tree):
        """``tree`` None: the caller saw the structure match (positional tensors only)."""
        spec = self._spec
        if self._dynamic is not None:
            self._dynamic.check(leaves)
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
        threads = self.options.threads
        if threads is None or threads == torch.get_num_threads():
            return self._call(args, kwargs)
        with _using_threads(threads):
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
            key = self._key(leaves)
            c = self._plans.get(key)
            if c is None:
                c = self._prepare(args, kwargs)
            else:
                self._calls += 1
                self._last_use[key] = self._calls
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

    # -- artifacts --------------------------------------------------------------------
    def save(self, path) -> None:
        """Write this compiled model, every specialization, to one artifact file (``kiln.save``)."""
        from .artifact import save

        save(self, path)

    def state(self) -> ModelState:
        """What an artifact records beside the plans (``kiln.artifact``)."""
        with self._lock:
            plans = sorted(self._plans.items(), key=lambda kv: self._last_use.get(kv[0], 0))
            return ModelState(self.name, self.options, self.is_onnx, self._spec, self._in_tree, self._tensor_args,
                              set(self._value_inputs), plans, self._dynamic)

    @classmethod
    def from_state(cls, state: ModelState) -> "CompiledModel":
        """A compiled model that runs the plans of ``state`` (a loaded artifact) and no others:
        it has no model to compile new shapes from."""
        self = cls.__new__(cls)
        self.options, self._infer_target, self.source, self.is_onnx = state.options, False, None, state.is_onnx
        self.name = state.name
        self._plans, self._last_use = {}, {}
        for i, (key, c) in enumerate(state.plans):
            self._plans[key], self._last_use[key] = c, i + 1
        self._saved = dict(self._plans)
        self._calls, self._evicted = len(state.plans), False
        self._latest = state.plans[-1][1] if state.plans else None
        self._lock = threading.Lock()
        self._spec, self._in_tree, self._tensor_args = state.spec, state.in_tree, state.tensor_args
        self._value_inputs = set(state.value_inputs)
        self._dynamic, self._dynamic_axes = state.dynamic, _axes_of(state.dynamic)
        self._dynamic_resolved = True
        return self

    def _saved_plan(self, leaves) -> Compiled:
        """A loaded model's plan for ``leaves``: the one saved for these shapes and dtypes
        (built for another thread count if need be: it runs correctly at any)."""
        key = self._key(leaves)
        for k, c in self._saved.items():
            if k[1:] == key[1:]:
                return c
        have = "; ".join(" ".join(_describe(e) for e in k[1:]) for k in self._saved)
        raise KilnError(f"{self.name} was loaded from an artifact with plans for [{have}]; got "
                        f"[{' '.join(_describe(e) for e in key[1:])}]. A loaded model cannot compile new shapes: "
                        f"compile and save the model with these inputs too")

    # -- introspection ----------------------------------------------------------------
    @property
    def compiled(self) -> list[Compiled]:
        return list(self._plans.values())

    def __repr__(self) -> str:
        return f"<kiln.CompiledModel {self.name} target={self.target} specializations={len(self._plans)}>"


def _describe(entry) -> str:
    """One input of a plan key, as a user reads it: float32[1, 128], or the value."""
    if entry[0] == "v":
        return entry[1]
    return f"{str(entry[1]).removeprefix('torch.')}{list(entry[0])}"


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


def compile(model=None, example_inputs=None, example_kwargs=None, *, options: CompileOptions | None = None,
            **keywords):
    """Compile a model with Kiln; returns a callable with the model's signature.

    ``model`` is an ``nn.Module``, a function of tensors, an ONNX file path or an
    ``onnx.ModelProto``. Without ``example_inputs`` the model compiles on its first call.
    Options are keywords (``precision="bf16"``, ``quantize="int8-dynamic"``, ... — see
    ``kiln.CompileOptions``) or a ``CompileOptions`` as ``options=`` (keywords override it).
    Also usable as a decorator: ``@kiln.compile`` or ``@kiln.compile(target="cpu")``.
    """
    options = CompileOptions.parse(options, **keywords)  # a bad option fails here, also for a decorator
    if model is None:
        return lambda m: CompiledModel(m, example_inputs, example_kwargs, options=options)
    return CompiledModel(model, example_inputs, example_kwargs, options=options)


@record(frozen=False, slots=False)
class Explanation:
    """What Kiln did with a model: its graph, op counts, every op that fell back, and (with
    ``profile``) where the compiled model's time goes, fallbacks first."""

    graph: Any
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)
    kernels: dict[str, int] = field(default_factory=dict)
    steps: list = field(default_factory=list)  # runtime.profile.StepTime per plan step (empty: not profiled)
    runs: int = 0

    def fallback_time(self) -> tuple[float, dict[str, tuple[int, float]]]:
        """(the profiled total seconds, fallback op -> (steps, seconds)), costliest first."""
        from kiln.runtime.profile import fallback_shares

        return fallback_shares(self.steps)

    def __str__(self) -> str:
        g = self.graph
        lines = [f"{g.name}: {len(g.nodes)} nodes, {len(g.constants)} constants "
                 f"({g.num_parameters():,} parameters)", f"fallbacks: {len(self.fallbacks)}"]
        for op, scope, why in self.fallbacks:
            lines.append(f"  {op}" + (f" at {scope}" if scope else "") + f": {why}")
        lines.append("kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels.items())))
        if self.steps:
            total, by_op = self.fallback_time()
            spent = sum(t for _, t in by_op.values())
            pct = (lambda t: 100 * t / total if total else 0.0)
            lines.append(f"time (each of {len(self.steps)} steps timed alone, median of {self.runs} runs; "
                         f"{total * 1e3:.3f} ms in all): fallbacks {spent * 1e3:.3f} ms ({pct(spent):.1f}%)")
            for op, (n, t) in by_op.items():
                lines.append(f"  {op} x{n}: {t * 1e3:.3f} ms ({pct(t):.1f}%)")
            lines.append("costliest steps:")
            for st in sorted(self.steps, key=lambda st: -st.seconds)[:8]:
                where = f" at {st.scope}" if st.scope else ""
                lines.append(f"  {st.kernel} ({st.op}{where}): {st.seconds * 1e3:.3f} ms ({pct(st.seconds):.1f}%)")
            lines.append("time by kernel:")
            for k, (n, t) in list(self.kernel_time().items())[:10]:
                lines.append(f"  {k} x{n}: {t * 1e3:.3f} ms ({pct(t):.1f}%)")
            split = self.thread_split()
            if any(rest > 0 for _, _, rest in split.values()):
                # which kernels share their work between threads, whatever else runs on the machine
                lines.append("CPU per kernel, the calling thread / the process's other threads (idle OpenMP "
                             "workers spin unless OMP_WAIT_POLICY=PASSIVE; their spinning counts):")
                for k, (n, mine, rest) in list(split.items())[:8]:
                    lines.append(f"  {k} x{n}: {mine * 1e3:.3f} / {rest * 1e3:.3f} ms")
        return "\n".join(lines)

    def kernel_time(self) -> dict[str, tuple[int, float]]:
        """kernel -> (steps, seconds) over the profiled steps, costliest first."""
        from kiln.runtime.profile import kernel_time

        return kernel_time(self.steps)

    def thread_split(self) -> dict[str, tuple[int, float, float]]:
        """kernel -> (steps, CPU seconds on the calling thread, on the other threads)."""
        from kiln.runtime.profile import thread_split

        return thread_split(self.steps)


def explain(model, example_inputs=None, example_kwargs=None, *, profile: bool = True, runs: int = 5,
            **keywords) -> Explanation:
    """Compile ``model`` and report which ops fell back to PyTorch and why; with ``profile``,
    also each fallback's share of the compiled model's time on the example inputs (every
    step timed alone, median of ``runs``)."""
    cm = CompiledModel(model, example_inputs, example_kwargs, **keywords)
    if cm.report is None:
        raise KilnError("kiln.explain needs example inputs for this model")
    c = cm.compiled[0]
    steps = []
    if profile and c.plan.runner is None:
        from kiln.runtime.profile import profile_plan

        leaves = pytree.tree_leaves((tuple(example_inputs) if isinstance(example_inputs, (list, tuple))
                                     else (example_inputs,), example_kwargs or {}))
        tensors = [torch.as_tensor(x).contiguous() for x in leaves if isinstance(x, torch.Tensor) or
                   type(x).__module__ == "numpy"]
        if len(tensors) == len(c.plan.input_slots):
            steps = profile_plan(c.plan, tensors, runs)
    return Explanation(c.graph, list(c.report.fallbacks), dict(c.report.kernels), steps, runs if steps else 0)

"""The import cache: a torch model's imported graph, reused without running torch.export.

Exporting is most of a warm compile (seconds: importing torch.export's machinery, tracing,
decomposing), and its result depends only on the model's code, configuration and input
types — not on weight values. An entry stores the imported graph with every parameter and
buffer *by name* (weights are bound from the model being compiled, never from the cache),
the output structure, the fallback list and the input names.

The key (``fingerprint``) covers, for every submodule: its name and class, the source file
of every class in its MRO outside torch, the files of the functions and classes its
methods reference as globals, its other attributes (values of plain data; functions and
classes by source file; a model holding an object whose only description is a memory
address is not cached at all), its forward hooks and pre-hooks in order (each function's
code, file, closure values, defaults and globals; a bound method or callable object as a
hook: not cached), its ``training`` flag, and its parameters' and buffers' names, shapes
and dtypes; plus the
example inputs' structure, shapes and dtypes (and non-tensor values), and the Kiln and torch
versions.

A key can still miss a behaviour change (a global configuration value read inside
``forward``, code reached through two levels of calls into another file). So a hit is
verified before it is trusted: the cached graph runs on the example inputs with the
reference (torch) kernels and must match the model's own outputs; otherwise the entry is
dropped and the model is exported again. ``KILN_CACHE=0`` turns the cache off.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import inspect
import json
import os
import sys
import threading
import types
import weakref

import torch
import torch.utils._pytree as pytree

from kiln.ir import Graph
from kiln.ir.serialize import SerializeError, from_json, to_json
from kiln.runtime import cache
from kiln.runtime.plan import build_plan

FORMAT = "kiln-import-cache/1"
_PRIMITIVE = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


@functools.lru_cache(maxsize=1024)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:  # noqa: ARG001 (stat fields key the memo)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _source_digest(obj) -> str | None:
    # inspect.getfile, with a compiled file's source beside it preferred, as
    # inspect.getsourcefile would; getsourcefile itself, asked about a file that does not
    # exist ("<string>"), resolves the real path of every module in sys.modules (once per
    # process, a visible share of a warm compile), and such a path has no digest either way
    try:
        path = inspect.getfile(obj)
    except (TypeError, OSError):
        return None
    if path.endswith(tuple(importlib.machinery.BYTECODE_SUFFIXES)):
        src = os.path.splitext(path)[0] + importlib.machinery.SOURCE_SUFFIXES[0]
        path = src if os.path.exists(src) else path
    try:
        st = os.stat(path)
        return f"{path}:{_file_digest(path, st.st_mtime_ns, st.st_size)}"
    except OSError:
        return None


def _is_torch(obj) -> bool:
    mod = getattr(obj, "__module__", None) or ""
    return mod == "torch" or mod.startswith("torch.")


def _code_globals(fn, seen: set) -> list:
    """Globals a function's code (and its nested code) names, resolved in its module."""
    code = getattr(fn, "__code__", None)
    if code is None or id(code) in seen:
        return []
    seen.add(id(code))
    names, stack = set(), [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    g = getattr(fn, "__globals__", {})
    return [g[n] for n in sorted(names) if n in g]


def _class_parts(cls, seen: set) -> list[str]:
    parts = []
    for k in cls.__mro__:
        if k is object or _is_torch(k):
            continue
        parts.append(f"{k.__module__}.{k.__qualname__}@{_source_digest(k)}")
        for attr in vars(k).values():
            fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            for obj in _code_globals(fn, seen):
                if isinstance(obj, types.ModuleType) or _is_torch(obj):
                    continue  # a module's own version is keyed when its functions are named
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    parts.append(f"global {getattr(obj, '__qualname__', '?')}@{_source_digest(obj)}")
                elif isinstance(obj, _PRIMITIVE):
                    parts.append(f"global {obj!r}")
    return parts


class _Unkeyable(Exception):
    """An attribute with no stable description: the model is exported every time."""


def _stable(v) -> str:
    """A description of an attribute that is the same in every process, or _Unkeyable."""
    if isinstance(v, _PRIMITIVE):
        return repr(v)
    if isinstance(v, torch.Tensor):
        return f"T{tuple(v.shape)}:{v.dtype}"  # values are weights: bound from the model
    if isinstance(v, weakref.ref):
        return "weakref"  # (nn.RNN keeps weak references to its own parameters)
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(map(_stable, v)) if isinstance(v, (set, frozenset)) else map(_stable, v)
        return f"{type(v).__name__}({', '.join(items)})"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_stable(k)}: {_stable(x)}" for k, x in v.items()) + "}"
    if inspect.isfunction(v) or inspect.isclass(v) or inspect.ismethod(v) or inspect.isbuiltin(v):
        return f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', '?')}@{_source_digest(v)}"
    r = repr(v)
    if " at 0x" in r:
        raise _Unkeyable(type(v).__name__)
    return f"{type(v).__module__}.{type(v).__qualname__}:{r}"


def _code_digest(code: types.CodeType) -> str:
    """The function's own code (bytecode, constants, names): two functions of one file differ."""
    h = hashlib.sha256()
    stack = [code]
    while stack:
        c = stack.pop()
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        for k in c.co_consts:
            if isinstance(k, types.CodeType):
                stack.append(k)
            else:
                h.update(repr(k).encode())
    return h.hexdigest()[:16]


def _function(fn, depth: int = 0) -> str:
    """A forward hook as the same text in every process: its code, the file it comes from,
    the values it closes over and its defaults (each as ``_stable`` describes it), and the
    globals its code names; ``_Unkeyable`` when any of these has no stable description."""
    if depth > 4:
        raise _Unkeyable("hook")
    if isinstance(fn, functools.partial):
        return (f"partial({_function(fn.func, depth + 1)}, {_stable(fn.args)}, "
                f"{_stable(dict(sorted(fn.keywords.items())))})")
    if not inspect.isfunction(fn):
        raise _Unkeyable(type(fn).__name__)  # a bound method or callable object: its state is unknown
    cells = []
    for c in fn.__closure__ or ():
        try:
            v = c.cell_contents
        except ValueError:  # a cell not yet assigned: what it will hold is unknown
            raise _Unkeyable("hook") from None
        cells.append(_function(v, depth + 1) if inspect.isfunction(v) else _stable(v))
    glob = []
    for obj in _code_globals(fn, set()):
        if isinstance(obj, types.ModuleType) or _is_torch(obj):
            continue
        glob.append(_stable(obj) if isinstance(obj, _PRIMITIVE) or inspect.isclass(obj) or inspect.isfunction(obj)
                    else f"{type(obj).__module__}.{type(obj).__qualname__}")
    return (f"{fn.__module__}.{fn.__qualname__}@{_source_digest(fn)}:{_code_digest(fn.__code__)}"
            f":cells{cells}:defaults{_stable(fn.__defaults__)}{_stable(fn.__kwdefaults__)}:globals{glob}")


def _hooks(m: torch.nn.Module) -> str:
    """The module's forward (pre-)hooks in the order they run, with their calling flags.
    Hooks change what ``forward`` computes (transformers installs output-capturing hooks on a
    model's first call), so they are part of the key; one with no stable description makes
    the model uncacheable."""
    parts = []
    for kind, hooks, with_kwargs, always in (
            ("pre", m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs, {}),
            ("post", m._forward_hooks, m._forward_hooks_with_kwargs, m._forward_hooks_always_called)):
        for hid, fn in hooks.items():
            parts.append(f"{kind}:{hid in with_kwargs}:{hid in always}:{_function(fn)}")
    return "|".join(parts)


_SKIP_ATTRS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks",
               "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_is_full_backward_hook", "training"}


def fingerprint(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic: str = "") -> str | None:
    """``dynamic``: the varying dims as text (a symbolic graph is another entry than the
    static one of the same model and inputs)."""
    from kiln import __version__

    if getattr(module, "_kiln_no_import_cache", False):
        return None
    h = hashlib.sha256()
    seen: set = set()
    h.update(f"{FORMAT}|{__version__}|{cache.code_fingerprint()}|{torch.__version__}|{sys.version_info[:2]}".encode())
    classes = set()
    described: dict[int, str] = {}  # by id: one object (a model's config) is held by many submodules

    def stable(v) -> str:
        if isinstance(v, _PRIMITIVE):
            return _stable(v)
        d = described.get(id(v))
        if d is None:
            d = described[id(v)] = _stable(v)
        return d

    for name, m in module.named_modules(remove_duplicate=False):
        try:
            attrs = sorted((k, stable(v)) for k, v in vars(m).items()
                           if k not in _SKIP_ATTRS and not isinstance(v, torch.nn.Module))
            hooks = _hooks(m)
        except _Unkeyable:
            return None
        h.update(f"|{name}:{type(m).__module__}.{type(m).__qualname__}:{m.training}:{attrs}:{hooks}".encode())
        for pn, p in list(m._parameters.items()) + list(m._buffers.items()):
            h.update(f"|{pn}:{None if p is None else (tuple(p.shape), p.dtype)}".encode())
        classes.add(type(m))
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        h.update("|".join(_class_parts(cls, seen)).encode())
    leaves, spec = pytree.tree_flatten((args, kwargs))
    if any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in leaves):
        return None  # the hit check runs the reference kernels: CPU inputs only
    h.update(str(spec).encode())
    h.update(f"|dynamic:{dynamic}".encode())
    for x in leaves:
        h.update((f"|T{tuple(x.shape)}:{x.dtype}:{x.device.type}" if isinstance(x, torch.Tensor)
                  else f"|V{x!r}").encode())
    return h.hexdigest()


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


def store(key: str, module: torch.nn.Module, graph: Graph, out_spec, out_literals: dict, fallbacks: list,
          names: list[str], limits: dict | None = None) -> None:
    """``limits``: size name -> (min, max) the model's trace narrowed a varying dim to."""
    by_ptr = {}
    for n, t in _named_tensors(module).items():
        by_ptr.setdefault((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype), n)
    refs = {}
    for v, t in graph.constants.items():
        n = by_ptr.get((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype))
        if n is not None and t.numel() > 0:
            refs[v] = n
    try:
        payload = {"graph": to_json(graph, refs), "out_spec": None if out_spec is None else pytree.treespec_dumps(out_spec),
                   "out_literals": [[k, v] for k, v in out_literals.items()], "fallbacks": [list(f) for f in fallbacks],
                   "names": list(names), "limits": [[n, lo, hi] for n, (lo, hi) in (limits or {}).items()]}
        json.dumps(payload)
    except Exception:  # noqa: BLE001  (an output structure or literal without a serial form: no entry)
        return
    cache.store("import:" + key, payload)


def load(key: str, module: torch.nn.Module, args: tuple, kwargs: dict, leaves: list):
    """(graph, out_spec, out_literals, fallbacks, names, limits) from a verified entry, else None."""
    hit = cache.load("import:" + key)
    if hit is None:
        return None
    named = _named_tensors(module)
    try:
        graph = from_json(hit["graph"], resolve=named.get)
        out_spec = None if hit["out_spec"] is None else pytree.treespec_loads(hit["out_spec"])
        literals = {int(k): v for k, v in hit["out_literals"]}
        fallbacks = [tuple(f) for f in hit["fallbacks"]]
        names = list(hit["names"])
        limits = {str(n): (lo, hi) for n, lo, hi in hit.get("limits", [])}
    except (SerializeError, KeyError, TypeError, ValueError):
        return None
    if not _same_outputs(graph, module, args, kwargs, leaves):
        return None
    return graph, out_spec, literals, fallbacks, names, limits


def _run_graph(graph: Graph, tensors: list, box: dict) -> None:
    try:
        with torch.no_grad():
            box["got"] = build_plan(graph, "reference").run(tensors)
    except Exception:  # noqa: BLE001  (a graph that cannot run is not the model)
        box["got"] = None


def _same_outputs(graph: Graph, module, args, kwargs, leaves) -> bool:
    """The cached graph (reference kernels) and the model, each run once on the example
    inputs, give the same outputs. The two runs are independent: the graph's runs on a
    helper thread while the model runs on the caller's (whose grad, autocast and other
    thread-local modes the model's call keeps); torch releases the interpreter lock inside
    its ops, so on a machine with a free core the check takes about one run's time."""
    tensors = [x.contiguous() for x in leaves if isinstance(x, torch.Tensor)]
    box: dict = {}
    helper = threading.Thread(target=_run_graph, args=(graph, tensors, box), name="kiln-import-check", daemon=True)
    helper.start()
    if any(m.training for m in module.modules()):
        # a module in training mode may update its buffers during the call (batch norm's
        # running statistics), which the graph reads: the graph runs first, alone
        helper.join()
    try:
        with torch.no_grad():
            want = [t for t in pytree.tree_leaves(module(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    except Exception:  # noqa: BLE001  (a model that cannot run here cannot confirm the entry)
        return False
    finally:
        helper.join()
    got = box.get("got")
    if got is None:
        return False
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            return False
        if w.is_floating_point():
            scale = max(1.0, float(w.abs().nan_to_num(0, 0, 0).max())) if w.numel() else 1.0
            if not torch.allclose(g, w, rtol=1e-4, atol=1e-5 * scale, equal_nan=True):
                return False
        elif not torch.equal(g, w):
            return False
    return True

"""The kernel registry, keyed by (OpKind, target).

Every op kind has a ``reference`` kernel (torch), which is the fallback and the test oracle.
Faster kernels register for a target with a predicate saying which nodes they accept. How
one is picked depends on the target: on ``cpu`` every accepting kernel and the reference are
candidates (``candidates``) and ``kernels.choice`` times them on the node's shapes, keeping
the fastest of those that agree with the reference (the first candidate when the shapes are
not static); on ``cuda`` the plan takes the first accepting kernel in registration order,
else the reference (``select_kernel``).
"""
from __future__ import annotations

import functools
import weakref
from typing import Callable

from kiln.ir import Node, OpKind
from kiln.ir.record import record

# CPU features (``kiln.target.CPU_FEATURES`` names) of the kernels that check for them at run time
AMX_BF16 = ("amx_tile", "amx_bf16", "avx512_bf16")
AVX512_BF16 = ("avx512f", "avx512_bf16")
VNNI = ("avx512bw", "avx512_vnni")

# A kernel is called as fn(inputs: list[Tensor | None], attrs) -> Tensor | tuple[Tensor, ...]
KernelFn = Callable[..., object]


@record(slots=False)
class Kernel:
    """``prepare(node, constants)``, when given, runs once when a plan is built (weight
    prepacking and other compile-time work) and returns the function the plan calls;
    ``constants`` holds the constant tensor of each operand (None for run-time values).

    ``dynamic``: the kernel serves nodes whose shapes are symbolic (sizes known only per
    call): it reads every size from its inputs at run time and its ``prepare`` depends on
    none of them. Other kernels are offered only nodes of static shapes.
    ``requires`` names the CPU features (``kiln.target.CPU_FEATURES``) the kernel cannot run
    without: a plan loaded from an artifact on a CPU that lacks one re-chooses that node's
    kernel (``accepts`` asks the host itself; ``requires`` answers for any target, a
    simulated one included).
    ``approximate``: the kernel computes a different sum than the reference's (a fast
    algorithm such as Winograd's transforms), so its rounding differs in kind; a plan that
    uses one is checked end to end before it is kept (``runtime.accuracy_guard``)."""

    op: OpKind
    target: str
    name: str
    fn: KernelFn
    accepts: Callable[[Node], bool] = lambda node: True
    prepare: Callable | None = None
    dynamic: bool = False
    requires: frozenset = frozenset()
    approximate: bool = False

    def runs_on(self, features) -> bool:
        """Whether a CPU with ``features`` has everything this kernel needs."""
        return self.requires <= frozenset(features)

    def bind(self, node: Node, constants: list) -> KernelFn:
        if self.prepare is None:
            return self.fn
        return _shared_binding(self, node, constants)


# A weight used by several nodes (a layer applied repeatedly: cross-layer parameter sharing)
# is prepacked once, not once per node: nodes with the same kernel, op, attributes, operand
# types and the very same constant tensors share one prepared function. Entries hold weak
# references only (the function, the constants), so a kernel candidate that lost its
# measurement, or a plan that was dropped, frees its packed weights as before.
_BOUND: dict[tuple, tuple] = {}


def _shared_binding(k: Kernel, node: Node, constants: list) -> KernelFn:
    held = [c for c in constants if c is not None]
    if not held:
        return k.prepare(node, constants)
    try:
        key = (k.name, k.target, node.op, node.attrs, tuple(None if v is None else v.type for v in node.inputs),
               tuple(o.type for o in node.outputs), tuple(None if c is None else id(c) for c in constants))
        hash(key)
    except TypeError:  # an attribute without a hash: prepare per node
        return k.prepare(node, constants)
    hit = _BOUND.get(key)
    if hit is not None:
        fn = hit[0]()
        if fn is not None and all(r() is c for r, c in zip(hit[1], held)):
            return fn
    fn = k.prepare(node, constants)
    try:
        _BOUND[key] = (weakref.ref(fn), [weakref.ref(c) for c in held])
    except TypeError:  # not weak-referenceable: not shared
        return fn
    if len(_BOUND) > 4096:
        for dead in [key for key, (f, _) in _BOUND.items() if f() is None]:
            del _BOUND[dead]
    return fn


_REGISTRY: dict[tuple[OpKind, str], list[Kernel]] = {}
# the modules whose import registers kernels (imported on first lookup, not at package import).
# Their order is the prior of kernel choice among candidates that measure tied: "mkl" comes
# before "onednn" because MKL's packed sgemm (what Inductor calls for frozen fp32 linears)
# is the faster fp32 GEMM at transformer shapes by less than the noise margin of one
# compile's measurement, so ties must go to it (docs/benchmarks.md, the model suite).
# "avx2_linear" (a candidate only where the CPU has no AVX-512) comes before both: where it
# runs, it serves every row count of a dynamic plan from one packed weight, where oneDNN's
# pads a new row count to a bucket, a cost the measurement at the representative sizes does
# not include (docs/benchmarks.md: BERT's stream at two threads, ties to oneDNN's).
_KERNEL_MODULES = ("rnn_cpu", "pool_cpu", "norm_cpu", "qact_cpu", "attention_cpu", "avx2_linear", "mkl", "onednn",
                   "amx_linear", "winograd", "quant", "quant_native", "reference", "sparse", "layout_cpu")


_loaded = False


def _load_kernel_modules() -> None:
    global _loaded
    if not _loaded:
        import importlib

        for m in _KERNEL_MODULES:
            importlib.import_module(f"{__package__}.{m}")
        _loaded = True


def _module_rank(fn) -> int:
    """Position of ``fn``'s module in ``_KERNEL_MODULES`` (other modules after them all)."""
    mod = getattr(fn, "__module__", "") or ""
    pkg, _, leaf = mod.rpartition(".")
    return _KERNEL_MODULES.index(leaf) if pkg == __package__ and leaf in _KERNEL_MODULES else len(_KERNEL_MODULES)


def register_kernel(op: OpKind, target: str, name: str | None = None, accepts=None, prepare=None,
                    dynamic: bool = False, requires=(), approximate: bool = False):
    def deco(fn: KernelFn) -> KernelFn:
        k = Kernel(op, target, name or fn.__name__, fn, accepts or (lambda node: True), prepare, dynamic,
                   frozenset(requires), approximate)
        ks = _REGISTRY.setdefault((op, target), [])
        # listed in _KERNEL_MODULES' order whichever module was imported first
        rank = _module_rank(fn)
        at = next((i for i, other in enumerate(ks) if _module_rank(other.fn) > rank), len(ks))
        ks.insert(at, k)
        return fn

    return deco


def kernels_for(op: OpKind, target: str) -> list[Kernel]:
    return list(_REGISTRY.get((op, target), []))


def candidates(node: Node, target: str) -> list[Kernel]:
    """Every kernel for ``target`` that accepts ``node``, else the reference kernel alone."""
    _load_kernel_modules()

    static = is_static(node)
    here = _host_features() if target == "cpu" else None
    ks = [k for k in _REGISTRY.get((node.op, target), [])
          if (static or k.dynamic) and (here is None or k.runs_on(here)) and k.accepts(node)] \
        if target != "reference" else []
    ref = select_kernel(node, "reference")
    return ks + [ref] if ks else [ref]  # the reference always competes (and is the oracle)


def select_kernel(node: Node, target: str) -> Kernel:
    """The first kernel for ``target`` that accepts ``node``, else the reference (the cuda
    plan's pick, and how callers get an op's reference kernel)."""
    _load_kernel_modules()

    if target != "reference":
        static = is_static(node)
        here = _host_features() if target == "cpu" else None
        for k in _REGISTRY.get((node.op, target), []):
            if (static or k.dynamic) and (here is None or k.runs_on(here)) and k.accepts(node):
                return k
    ks = _REGISTRY.get((node.op, "reference"))
    if not ks:
        raise KeyError(f"no reference kernel for {node.op.value}")
    return ks[0]


@functools.cache
def _host_features() -> frozenset:
    """This CPU's features (``kiln.target.CPU_FEATURES``): a kernel that ``requires`` one it
    lacks is no candidate here."""
    from kiln.target import host_cpu

    return host_cpu().features


def is_static(node: Node) -> bool:
    """Every operand and result of ``node`` has a static shape."""
    return all(v is None or v.type.is_static for v in (*node.inputs, *node.outputs))


def kernel_named(name: str) -> Kernel | None:
    """The registered kernel called ``name`` (None when no kernel has that name)."""
    _load_kernel_modules()

    return next((k for ks in _REGISTRY.values() for k in ks if k.name == name), None)


def all_kernels() -> list[Kernel]:
    _load_kernel_modules()

    return [k for ks in _REGISTRY.values() for k in ks]

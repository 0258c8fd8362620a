"""Generated kernels for whole kernel groups (TensorIR via ``kiln.codegen.tvm``).

For one group this module tunes the schedule (``kiln.codegen.autotune``: winners persist in
the tuning database), compiles the winner, exports it as a shared library into the compile
cache and wraps it as a plan kernel ``fn(inputs, attrs) -> outputs`` that allocates the
group's outputs and lets the generated code write into them (torch tensors go to TVM
through DLPack, no copies). A module already in the cache is loaded with the TVM runtime
library alone (``tvm_ffi``): a warm compile neither imports the TVM compiler nor generates
code.

``choose_group`` decides, by measurement on the group's real shapes, between the generated
kernel and the per-node kernels the plan would otherwise run; the generated kernel must
first agree with the torch reference, so one that disagrees never wins.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import tempfile
import time

import torch

from kiln.ir import LayoutKind, OpKind

from .choice import REPEATS, _agrees, _random_like, _timed

KERNEL_PREFIX = "tvm.group."
ALIGNMENT = 64  # bytes: what TVM assumes of every buffer it is given
# TVM's pool threads spin-wait for the next parallel loop by default, taking cores from the
# torch/oneDNN kernels that run between generated ones: let them sleep at once instead
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
_LOADED: dict[str, object] = {}  # module path -> loaded function
_CHOICE: dict[tuple, bool] = {}  # (signature, threads, node kernels) -> generated wins
_runtime_ready = False
# TVM's thread pool, as Kiln sized it (None: not yet). Left to the user when they set
# TVM_NUM_THREADS themselves.
_pool_threads: int | None = None
_USER_POOL = "TVM_NUM_THREADS" in os.environ
# id() of loaded kernels whose parallel loops run on torch's OpenMP workers (see
# _launch_on_openmp); others (tuning candidates built in memory) use TVM's own pool.
_ON_OPENMP: set[int] = set()


def _launch_on_openmp(path: str) -> bool:
    """Point the loaded module at ``path`` to Kiln's OpenMP launcher for its parallel loops.

    TVM's generated host code starts parallel loops through a function pointer each exported
    module holds (``__TVMBackendParallelLaunch``, set to TVM's thread pool when the module
    loads). That pool is a second set of threads beside torch's OpenMP workers, which spin
    for a while after each parallel torch op, so a generated kernel after a torch op shared
    a core with a spinning worker: the 2-thread ``kiln bench elementwise`` reached 61% of
    the copy bandwidth, 101% with the spinning off (OMP_WAIT_POLICY=PASSIVE; one-off pair of
    runs). ``kiln._C``'s launcher runs the tasks on the OpenMP workers themselves.
    ``KILN_TVM_THREAD_POOL=1`` keeps TVM's pool (for comparison)."""
    if os.environ.get("KILN_TVM_THREAD_POOL") == "1":
        return False
    try:
        from kiln import _C

        lib = ctypes.CDLL(path)  # the handle the TVM runtime already opened (same file)
        hook = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch")
    except (ImportError, OSError, ValueError):  # no extension, or no parallel loops
        return False
    try:  # a barrier inside a parallel loop needs TVM's pool (Kiln's schedules emit none)
        ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelBarrier")
        return False
    except ValueError:
        pass
    hook.value = _C.tvm_parallel_launch_address()
    return True


def tvm_pool_threads(threads: int) -> None:
    """Size TVM's thread pool for kernels built with ``threads`` threads of parallel loops.

    Left alone, TVM's runtime gives its pool half the cores on x86 (it assumes two
    hyperthreads per core) and pins its threads, the calling one included, to cores: on a
    2-core machine every "parallel" generated kernel ran on one core (CPU time / wall time
    1.00 in a one-off check), and pinning would tie torch's main thread to one core. So
    Kiln sizes the pool to the plan's thread count, unpinned (TVM_BIND_THREADS=0), and
    resizes it only when a plan of another thread count runs. Loaded (exported) kernels do
    not use this pool (``_launch_on_openmp``); tuning candidates built in memory do, and all
    kernels with ``KILN_TVM_THREAD_POOL=1``."""
    global _pool_threads
    if _pool_threads == threads or _USER_POOL:
        return
    _load_runtime()
    import tvm_ffi

    os.environ["TVM_NUM_THREADS"] = str(threads)  # TVM caps the pool at this (read on configure)
    os.environ["TVM_BIND_THREADS"] = "0"
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, threads)
    _pool_threads = threads


class GeneratedKernel:
    """A compiled group kernel: ``self(inputs, attrs)`` returns the group's outputs (a tensor
    or a tuple, in ``group.outputs`` order)."""

    def __init__(self, func, group, name: str, config: dict, built: bool, tuning=None, threads: int = 1):
        self.func, self.name, self.config, self.built = func, name, config, built
        self.threads = threads  # built with parallel loops for this many threads (1: none)
        self.tvm_pool = threads > 1 and id(func) not in _ON_OPENMP  # else torch's OpenMP workers
        self.tuning = tuning  # the tuner's TuneResult (trials measured, database hit)
        self.in_nhwc = tuple(_nhwc(v) for v in group.inputs)
        self.outs = tuple((tuple(v.type.shape), v.type.dtype.to_torch(), _nhwc(v)) for v in group.outputs)

    def __call__(self, ins, attrs=None):
        args = []
        for t, nhwc in zip(ins, self.in_nhwc):
            if nhwc:
                t = t.permute(0, 2, 3, 1)  # the physical NHWC order of a channels-last tensor
            if not t.is_contiguous() or t.data_ptr() % ALIGNMENT:
                # the generated code assumes compact buffers on TVM's 64-byte alignment (it
                # uses aligned vector loads): views at an offset and foreign (numpy) memory
                # are copied into a fresh torch allocation, which is 64-byte aligned
                t = t.clone(memory_format=torch.contiguous_format)
            args.append(t)
        outs, views = [], []
        for shape, dt, nhwc in self.outs:
            o = torch.empty(shape, dtype=dt, memory_format=torch.channels_last if nhwc else torch.contiguous_format)
            outs.append(o)
            views.append(o.permute(0, 2, 3, 1) if nhwc else o)
        if self.tvm_pool and _pool_threads != self.threads:
            tvm_pool_threads(self.threads)
        self.func(*args, *views)
        return outs[0] if len(outs) == 1 else tuple(outs)


def _nhwc(v) -> bool:
    return v.type.layout.kind is LayoutKind.CHANNELS_LAST and v.type.rank == 4


# ----------------------------------------------------------------------------- the module cache
def module_dir() -> str:
    """``<cache root>/compile/tvm``: beside the compile cache's entries."""
    from kiln.runtime.cache import cache_dir

    return cache_dir(os.path.join("compile", "tvm"))


def evict_modules(max_bytes: int | None = None) -> None:
    """Keep the exported modules under ``KILN_TVM_CACHE_MAX_MB`` (default 512), least recently used out first."""
    from kiln.runtime.cache import evict_lru

    if max_bytes is None:
        max_bytes = int(float(os.environ.get("KILN_TVM_CACHE_MAX_MB", "512")) * 1024 * 1024)
    evict_lru(module_dir(), max_bytes, lambda name: True)


def _tvm_version() -> str:
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def module_key(signature: str, config: dict, target, threads: int) -> str:
    """What determines the machine code: the group, the schedule config, the target (CPU
    name and ISA features), the thread count (parallel loops or none) and the versions."""
    from kiln import __version__
    from kiln.codegen.tvm import CODEGEN_VERSION

    parts = [__version__, str(CODEGEN_VERSION), _tvm_version(), signature, json.dumps(config, sort_keys=True), target.key(), str(threads)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _load_runtime() -> None:
    """Make the TVM runtime library's symbols global (exported modules call its thread pool)."""
    global _runtime_ready
    if _runtime_ready:
        return
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("apache-tvm is not installed")
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi, which the runtime library links against)

    lib = os.path.join(list(spec.submodule_search_locations)[0], "lib", "libtvm_runtime.so")
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    _runtime_ready = True


def load_cached(key: str):
    """The cached module's function for ``key``, or None (absent or unloadable: rebuilt)."""
    path = os.path.join(module_dir(), f"{key}.so")
    if path in _LOADED:
        return _LOADED[path]
    if not os.path.exists(path):
        return None
    try:
        _load_runtime()
        import tvm_ffi

        fn = tvm_ffi.load_module(path)["main"]
    except Exception:  # a truncated or foreign file: rebuild it, never trust it
        return None
    _LOADED[path] = fn
    if _launch_on_openmp(path):
        _ON_OPENMP.add(id(fn))
    try:
        os.utime(path)
    except OSError:
        pass
    return fn


def build_and_store(group, config: dict, target, threads: int, key: str):
    """Generate code for ``group`` with ``config``, export it under ``key`` (atomically), load it."""
    from kiln.codegen import tvm as tvm_codegen

    ex = tvm_codegen.build(group, config, target, threads)
    d = module_dir()
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        ex.export_library(tmp)
        os.replace(tmp, os.path.join(d, f"{key}.so"))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    evict_modules()
    fn = load_cached(key)
    if fn is None:
        raise RuntimeError(f"exported module {key}.so does not load")
    return fn


def compiled(group, config: dict, target, threads: int) -> tuple[object, bool]:
    """(function, built now?) for ``group`` under ``config``: from the cache when present."""
    from kiln.codegen.tvm import signature

    key = module_key(signature(group), config, target, threads)
    fn = load_cached(key)
    if fn is not None:
        return fn, False
    return build_and_store(group, config, target, threads, key), True


def _build_in_memory(group, config: dict, target, threads: int):
    """A candidate for tuning: compiled, not exported (only the winner is kept)."""
    from kiln.codegen import tvm as tvm_codegen

    return tvm_codegen.build(group, config, target, threads)["main"]


# ----------------------------------------------------------------------------- tuning
def group_inputs(group, graph) -> list:
    """Inputs to measure on: the constants as they are, random tensors for run-time values."""
    return [graph.constants[v] if v in graph.constants else _random_like(v) for v in group.inputs]


def reference_outputs(group, ins: list) -> list:
    """The group's outputs computed node by node with the torch reference kernels."""
    from .registry import select_kernel

    return run_nodes(group, ins, [select_kernel(n, "reference").fn for n in group.nodes])


def run_nodes(group, ins: list, fns: list) -> list:
    env = dict(zip(group.inputs, ins))
    for n, fn in zip(group.nodes, fns):
        r = fn([None if v is None else env[v] for v in n.inputs], n.attrs)
        for v, t in zip(n.outputs, r if isinstance(r, tuple) else (r,)):
            env[v] = t
    return [env[v] for v in group.outputs]


def _views_only(outs: list, ins: list) -> bool:
    """Every output is a view of an input (a slice then a reshape, say): the per-node kernels
    move no data, and a generated kernel, which writes its outputs, cannot beat that; not
    generating it also saves the TVM import and build at compile time."""
    storages = {t.untyped_storage().data_ptr() for t in ins if isinstance(t, torch.Tensor)}
    return all(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in storages for o in outs)


# ops torch runs as a view of their input wherever the input's strides allow
_VIEW_OPS = frozenset({OpKind.RESHAPE, OpKind.PERMUTE, OpKind.EXPAND, OpKind.SLICE})


def _view_ops_only(group) -> bool:
    """Every node is a reshape, permute, expand or slice. Run one by one in torch they make
    views wherever the run-time input's strides allow, and copy once (torch's copy kernel)
    where they do not. The choice cannot see which: it times contiguous random inputs, while
    the plan's may be strided -- BERT's attention output is [B,H,S,D] over [B,S,H,D] memory,
    so its permute + reshape is free in torch but a copy (after a clone) in a generated kernel."""
    return all(n.op in _VIEW_OPS for n in group.nodes)


def _best_time(fn, repeats: int = REPEATS) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def generated_kernel(group, graph, target, threads: int, tune="fast", db=None) -> GeneratedKernel:
    """Tune (or take the tuning database's winner), compile (or load from the cache) and wrap."""
    from kiln.codegen.autotune import TuningKey, tune as run_tuner
    from kiln.codegen.schedules_cpu import tune_space
    from kiln.codegen.tvm import CODEGEN_VERSION, signature, signature_hash

    sig = signature(group)
    # the schedule template's version is part of the key: a config tuned for an older
    # template (what its knobs meant then) is not reused
    key = TuningKey(f"tvm.group.v{CODEGEN_VERSION}", f"{sig}\nthreads={threads}", target.key())
    space = tune_space(group, threads)
    ins = ref = None

    def measure(cfg: dict) -> float:
        nonlocal ins, ref
        if ins is None:
            ins = group_inputs(group, graph)
            with torch.no_grad():
                ref = reference_outputs(group, ins)
        k = GeneratedKernel(_build_in_memory(group, cfg, target, threads), group, "", cfg, True, threads=threads)
        if not _agrees(tuple(_as_list(k(ins))), tuple(ref)):
            return math.inf  # wrong numbers never win
        return _best_time(lambda: k(ins))

    result = run_tuner(key, space, measure, tune, db=db)
    fn, built = compiled(group, result.config, target, threads)
    return GeneratedKernel(fn, group, KERNEL_PREFIX + signature_hash(group), result.config, built, result, threads)


def _as_list(out) -> list:
    return list(out) if isinstance(out, tuple) else [out]


# ----------------------------------------------------------------------------- the choice
# A group whose per-node kernels take less than this is left alone: a generated kernel could
# save at most this much per call, while generating it costs a TVM import and a build at
# compile time.
WORTH_GENERATING_S = 10e-6


def choose_group(group, graph, make_kernel, node_fns: list, threads: int) -> "GeneratedKernel | None":
    """The generated kernel for ``group`` (``make_kernel(group)``, or None when it cannot be
    generated) if it beats running ``node_fns`` (the per-node choices) one by one, else None.
    It must first agree with the reference. Groups of view-making ops only, groups whose
    per-node kernels only make views, or take less than ``WORTH_GENERATING_S``, are not
    generated at all. Decisions are memoized per process.
    ``KILN_GROUP_CHOICE=generated`` skips the timing (an agreeing generated kernel wins), for
    tests and debugging, as ``KILN_KERNEL_CHOICE=first`` does for per-node kernels."""
    from kiln.codegen.tvm import signature

    forced = os.environ.get("KILN_GROUP_CHOICE") == "generated"
    memo = (signature(group), threads, forced, tuple(getattr(f, "__qualname__", repr(f)) for f in node_fns))
    if (memo in _CHOICE and not _CHOICE[memo]) or (not forced and _view_ops_only(group)):
        return None
    ins = group_inputs(group, graph)
    with torch.no_grad():
        node_t = None
        if not forced and memo not in _CHOICE:
            try:
                if _views_only(run_nodes(group, ins, node_fns), ins):
                    _CHOICE[memo] = False
                    return None
                node_t = _best_time(lambda: run_nodes(group, ins, node_fns))
            except Exception:  # noqa: BLE001  (e.g. an integer division by the random zeros)
                node_t = 0.0  # nothing to compare against: keep the per-node kernels
            if node_t < WORTH_GENERATING_S:
                _CHOICE[memo] = False
                return None
        kernel = make_kernel(group)
        if kernel is None:
            _CHOICE[memo] = False
            return None
        if memo in _CHOICE:
            return kernel
        try:
            ref = reference_outputs(group, ins)
            ok = _agrees(tuple(_as_list(kernel(ins))), tuple(ref))
        except Exception:
            ok = False
        if ok and not forced:  # both again, in turn, so machine noise hits them alike
            gen_t, nodes_t = _timed([lambda i, a: kernel(i), lambda i, a: run_nodes(group, i, node_fns)], ins, None)
            ok = gen_t < nodes_t
    _CHOICE[memo] = ok
    return kernel if ok else None

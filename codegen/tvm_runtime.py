"""Running TVM-generated kernels inside Kiln's plans: the runtime library, loaded modules,
the thread pool, and ``GeneratedKernel``, the wrapper a plan calls.

A generated group kernel is a TVM ``main`` function over DLPack tensors. ``GeneratedKernel``
allocates the group's outputs and lets the function write into them (no copies). An
exported module (a shared library) is loaded with the TVM runtime libraries alone, through
the FFI's C ABI (``codegen.tvm_capi``): a warm compile or ``kiln.load`` neither imports the
TVM compiler nor the ``tvm_ffi`` package, nor generates code.
"""
from __future__ import annotations

import ctypes

import torch

from kiln.ir import LayoutKind
from kiln.options import configure_tvm_environment, settings

ALIGNMENT = 64  # bytes: what TVM assumes of every buffer it is given
_runtime_ready = False
# TVM's thread pool, as Kiln sized it (None: not yet). Left to the user when they set
# TVM_NUM_THREADS themselves (read before Kiln sets it).
_pool_threads: int | None = None
_USER_POOL = settings().user_tvm_threads
# id() of loaded kernels whose parallel loops run on torch's OpenMP workers (see
# launch_on_openmp); others (tuning candidates built in memory) use TVM's own pool.
_ON_OPENMP: set[int] = set()
_LOADED: dict[str, object] = {}  # module path -> loaded function


def load_runtime() -> None:
    """Load the TVM FFI and runtime libraries with global symbols (exported modules call the
    runtime's thread pool); raises ImportError when apache-tvm is not installed."""
    global _runtime_ready
    if _runtime_ready:
        return
    configure_tvm_environment()  # before the pool exists: its threads must not spin
    from .tvm_capi import library

    library()
    _runtime_ready = True


def launch_on_openmp(path: str) -> bool:
    """Point the loaded module at ``path`` to Kiln's OpenMP launcher for its parallel loops.

    TVM's generated host code starts parallel loops through a function pointer each exported
    module holds (``__TVMBackendParallelLaunch``, set to TVM's thread pool when the module
    loads). That pool is a second set of threads beside torch's OpenMP workers, which spin
    for a while after each parallel torch op, so a generated kernel after a torch op shared
    a core with a spinning worker (``kiln bench elementwise`` at two threads shows the
    cost). ``kiln._C``'s launcher runs the tasks on the OpenMP workers themselves.
    ``KILN_TVM_THREAD_POOL=1`` keeps TVM's pool (for comparison)."""
    if settings().tvm_thread_pool:
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


def load_module(path: str):
    """The ``main`` function of the exported module at ``path`` (loaded once per process),
    its parallel loops on torch's OpenMP workers where possible; raises if it does not load."""
    if path in _LOADED:
        return _LOADED[path]
    load_runtime()
    from .tvm_capi import ExportedFunction

    fn = ExportedFunction(path)
    _LOADED[path] = fn
    if launch_on_openmp(path):
        _ON_OPENMP.add(id(fn))
    return fn


def tvm_pool_threads(threads: int) -> None:
    """Size TVM's thread pool for kernels built with ``threads`` threads of parallel loops.

    Left alone, TVM's runtime gives its pool half the cores on x86 (it assumes two
    hyperthreads per core) and pins its threads, the calling one included, to cores: on a
    2-core machine every "parallel" generated kernel ran on one core, and pinning would tie
    torch's main thread to one core. So Kiln sizes the pool to the plan's thread count,
    unpinned, and resizes it only when a plan of another thread count runs. Loaded
    (exported) kernels do not use this pool (``launch_on_openmp``); tuning candidates built
    in memory do, and all kernels with ``KILN_TVM_THREAD_POOL=1``."""
    global _pool_threads
    if _pool_threads == threads or _USER_POOL:
        return
    load_runtime()
    from .tvm_capi import config_threadpool

    configure_tvm_environment(threads)  # TVM caps the pool at this (read on configure)
    config_threadpool(threads)
    _pool_threads = threads


class GeneratedKernel:
    """A compiled group kernel: ``self(inputs, attrs)`` returns the group's outputs (a tensor
    or a tuple, in ``group.outputs`` order)."""

    def __init__(self, func, group, name: str, config: dict, built: bool, tuning=None, threads: int = 1):
        self.func, self.name, self.config, self.built = func, name, config, built
        self.group = group  # what it computes: an artifact ships its module by (group, config, threads)
        self.threads = threads  # built with parallel loops for this many threads (1: none)
        self.tvm_pool = threads > 1 and id(func) not in _ON_OPENMP  # else torch's OpenMP workers
        self.tuning = tuning  # the tuner's TuneResult (trials measured, database hit)
        self.in_nhwc = tuple(_nhwc(v) for v in group.inputs)
        self.outs = tuple((tuple(v.type.shape), v.type.dtype.to_torch(), _nhwc(v)) for v in group.outputs)
        # symbolic sizes (one kernel serves every value): where each is read off the inputs,
        # and the output shapes per tuple of sizes seen (a few lengths recur in a stream)
        self.size_at = _size_positions(group)
        self._shapes: dict[tuple, tuple] = {}
        # symbolic sizes: the parallel loops are built in and a call with less work than two
        # grains runs them on this thread alone (schedules_cpu._run_time_parallel); on TVM's
        # own pool (KILN_TVM_THREAD_POOL=1, tuning candidates) every call runs them in parallel
        self.serial_below = 2 * int(config.get("grain", 0)) \
            if threads > 1 and self.size_at and id(func) in _ON_OPENMP else 0
        # the common case, a static group in plain layouts on torch's workers (or serial):
        # operands passed as they come, outputs allocated from their recorded shapes
        self.plain = not (any(self.in_nhwc) or any(nhwc for _, _, nhwc in self.outs) or self.size_at or
                          self.tvm_pool or self.serial_below)

    def out_shapes(self, ins) -> tuple:
        """Each output's shape for this call's inputs."""
        if not self.size_at:
            return tuple(shape for shape, _, _ in self.outs)
        key = tuple(ins[i].shape[axis] for i, axis in self.size_at.values())
        shapes = self._shapes.get(key)
        if shapes is None:
            sizes = dict(zip(self.size_at, key))
            shapes = tuple(tuple(d if isinstance(d, int) else sizes[d.name] for d in shape)
                           for shape, _, _ in self.outs)
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()  # bounded: a stream of ever new sizes starts over
            self._shapes[key] = shapes
        return shapes

    def __call__(self, ins, attrs=None):
        if self.plain:
            for t in ins:
                if not t.is_contiguous() or t.data_ptr() % ALIGNMENT:
                    break  # (copied below)
            else:
                outs = [torch.empty(shape, dtype=dt) for shape, dt, _ in self.outs]
                self.func(*ins, *outs)
                return outs[0] if len(outs) == 1 else tuple(outs)
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
        for shape, (_, dt, nhwc) in zip(self.out_shapes(ins), self.outs):
            o = torch.empty(shape, dtype=dt, memory_format=torch.channels_last if nhwc else torch.contiguous_format)
            outs.append(o)
            views.append(o.permute(0, 2, 3, 1) if nhwc else o)
        if self.tvm_pool and _pool_threads != self.threads:
            tvm_pool_threads(self.threads)
        if self.serial_below and max(t.numel() for t in (*args, *outs)) < self.serial_below:
            from kiln import _C

            _C.tvm_parallel_serial(True)
            try:
                self.func(*args, *views)
            finally:
                _C.tvm_parallel_serial(False)
        else:
            self.func(*args, *views)
        return outs[0] if len(outs) == 1 else tuple(outs)


MAX_SHAPES = 256  # output shapes remembered per symbolic kernel


def _size_positions(group) -> dict:
    """name -> (input index, axis) of each named symbolic size in ``group``'s outputs: the
    first input dim that is that size. Raises when an output's size is not an input's dim
    (the renderer declines such groups)."""
    at: dict = {}
    for i, v in enumerate(group.inputs):
        for axis, d in enumerate(v.type.shape):
            if not isinstance(d, int):
                at.setdefault(d.name, (i, axis))
    need = {d.name for v in group.outputs for d in v.type.shape if not isinstance(d, int)}
    missing = need - set(at)
    if missing:
        raise ValueError(f"output sizes {sorted(missing)} are no input's dims")
    return {name: at[name] for name in sorted(need)}


def _nhwc(v) -> bool:
    return v.type.layout.kind is LayoutKind.CHANNELS_LAST and v.type.rank == 4

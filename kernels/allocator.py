"""How a process that runs Kiln's plans allocates its buffers: Kiln's pool, glibc's thresholds.

A plan allocates each step's output afresh (through torch, oneDNN or Kiln's own kernels) and
frees it after its last use. Left to glibc, two things go wrong:

* glibc serves a request above its mmap threshold with a fresh ``mmap`` (the threshold starts
  at 128 KiB and rises to the size of each mapped block freed, up to 32 MiB) and gives the
  top of its heap back to the OS whenever more than its trim threshold lies free there: a
  plan whose buffers are a few MiB returns and re-faults the same memory on every call, a
  page fault per 4 KiB, costly on a virtual machine (docs/benchmarks.md: glibc's thresholds,
  SegFormer);
* buffers under the threshold come from the heap, between long-lived small objects: when
  the sizes change from call to call (a dynamic plan serving batches of 1-32) the freed
  space does not fit the next call's sizes and the heap grows well past what any call needs
  (docs/benchmarks.md: the dynamic streams' RSS).

``KILN_MALLOC`` picks what Kiln does about it, once per process: glibc's thresholds when Kiln
first measures kernels or builds a CPU plan (``kernels.choice``, ``runtime.plan.Plan``), the
pool when it first builds a plan to run on the host (a compile's measurements before that
run beside glibc's heap, which keeps less of what they free than a cache would):

* ``pool`` (the default): torch's CPU allocations of at least ``POOL_THRESHOLD`` bytes come
  from Kiln's caching allocator (``csrc/cpu_pool.cpp``): freed blocks are cached and handed
  out again best-fit, split and merged, so a stream of varying sizes reuses the blocks of
  its largest call instead of growing the heap or faulting pages in; the pool's mappings
  never exceed 1.25x the most bytes live at once, a block cached unused for
  ``POOL_IDLE_SECONDS`` is unmapped at the pool's next use, and ``empty_cache`` unmaps what
  is cached.
  glibc's thresholds are set as for ``tuned``, for the smaller buffers.
* ``tuned``: only glibc's thresholds: mmap at 32 MiB (the ceiling glibc's own dynamic
  threshold reaches), trim at 64 MiB.
* ``system``: nothing changes.

Both affect the whole process, as allocator settings do: every torch CPU tensor of the pool's
size, the user's own included, comes from the pool once it is installed, and it stays
installed. Where the C library is not glibc the thresholds are left alone.
"""
from __future__ import annotations

import ctypes
import threading

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20

POOL_THRESHOLD = 1 << 20  # smaller buffers stay with glibc (its heap serves them well)
POOL_IDLE_SECONDS = 10.0  # a block cached this long unused is given back at the pool's next use

_thresholds: str | None = None  # "tuned", "system" or "unavailable", once applied
_pool: bool | None = None  # whether the pool was installed, once asked for
_lock = threading.Lock()


def tune_allocator(pool: bool = False) -> str:
    """Apply ``KILN_MALLOC`` once per process: glibc's thresholds at the first call (Kiln's
    first kernel measurement or plan), the pool when ``pool`` is first asked for (by the first
    plan built to run on the host: measuring candidates during a compile runs beside glibc's
    heap, which keeps less of what the measurements free). What is in effect: "pool" (Kiln's
    pool, and glibc's thresholds where the C library is glibc), "tuned" (glibc's
    thresholds), "system" (left alone by request) or "unavailable" (not glibc, no pool)."""
    global _thresholds, _pool
    if _thresholds is None or (pool and _pool is None):
        with _lock:
            if _thresholds is None:
                _thresholds = _apply(pool=False)
            if pool and _pool is None:
                _pool = _apply(pool=True) == "pool"
    return "pool" if _pool else _thresholds


def _apply(libc=None, pool: bool = True) -> str:
    """Set glibc's thresholds (``pool`` False) or install the pool (``pool`` True) as
    ``KILN_MALLOC`` asks; what is then in effect."""
    from kiln.options import settings

    mode = settings().malloc
    if mode == "system":
        return "system"
    if not pool:
        return _set_thresholds(libc)
    return "pool" if mode == "pool" and _install_pool() else "not installed"


def _install_pool() -> bool:
    try:
        from . import _cpu_pool
    except ImportError:  # a build without the pool module (not Linux)
        return False
    _cpu_pool.install(POOL_THRESHOLD, POOL_IDLE_SECONDS)
    return True


def _set_thresholds(libc=None) -> str:
    try:
        libc = libc if libc is not None else ctypes.CDLL(None)  # the process's own C library
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: mallopt's parameters are glibc's)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "unavailable"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "tuned" if ok else "unavailable"


def memory_stats() -> dict[str, int]:
    """The pool's counters: bytes live (handed out), cached (freed, kept for reuse), the most
    ever live at once, and mapped from the OS; blocks reused (hits), mapped anew (misses),
    split, merged and unmapped. Empty when the pool is not installed."""
    from . import _cpu_pool

    return dict(_cpu_pool.stats()) if _cpu_pool.installed() else {}


def empty_cache() -> int:
    """Give every block the pool has cached back to the OS and restart its high-water mark
    (its bound) from the bytes in use; the bytes given back (0 when the pool is not
    installed). Buffers in use are untouched."""
    from . import _cpu_pool

    return int(_cpu_pool.empty_cache()) if _cpu_pool.installed() else 0

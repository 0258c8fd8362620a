"""glibc malloc's thresholds, set once for a process that runs Kiln's plans.

A plan allocates each step's output afresh (through torch, oneDNN or Kiln's own kernels) and
frees it after its last use. glibc serves a request above its mmap threshold with a fresh
``mmap`` (the threshold starts at 128 KiB and rises to the size of each mapped block freed,
up to 32 MiB) and gives the top of its heap back to the OS whenever more than its trim
threshold (twice the mmap threshold) lies free there. A plan whose buffers are a few MiB
then returns and re-faults the same memory on every call, a page fault per 4 KiB, which is
costly on a virtual machine (docs/benchmarks.md: glibc's thresholds, SegFormer).

``tune_allocator`` sets the mmap threshold to 32 MiB (the ceiling glibc's own dynamic
threshold reaches) and the trim threshold to 64 MiB: buffers under 32 MiB are reused from
the heap, and at most 64 MiB of free heap top is kept from the OS. It runs once per
process, when Kiln first measures kernels or builds a CPU plan (``kernels.choice``,
``runtime.plan.Plan``), and affects the whole process, as an allocator setting does:
``KILN_MALLOC=system`` leaves glibc's defaults. Where the C library is not glibc nothing is
changed.
"""
from __future__ import annotations

import ctypes
import threading

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20

_state: str | None = None  # "tuned", "system" (KILN_MALLOC=system) or "unavailable"
_lock = threading.Lock()


def tune_allocator() -> str:
    """Set glibc's thresholds (once per process); what was done: "tuned", "system" (left
    alone by request) or "unavailable" (not glibc)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _apply()
    return _state


def _apply(libc=None) -> str:
    from kiln.options import settings

    if settings().malloc == "system":
        return "system"
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

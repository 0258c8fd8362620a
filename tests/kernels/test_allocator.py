"""kernels.allocator: Kiln's pool and glibc malloc's thresholds, set once per process, or left alone
(the pool itself: test_cpu_pool.py)."""
import ctypes
import sys

import pytest

from kiln.errors import KilnError
from kiln.kernels import allocator
from kiln.options import settings


class _Mallopt:
    """Stands in for a ctypes function: takes argtypes/restype, records its calls."""
    argtypes = restype = None

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, param, value):
        self.calls.append((param, value))
        return 1


class _Libc:
    def __init__(self, glibc=True):
        self.calls = []
        self.mallopt = _Mallopt(self.calls)
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.35"


def test_sets_the_mmap_and_trim_thresholds_on_glibc(monkeypatch):
    monkeypatch.setenv("KILN_MALLOC", "tuned")
    lib = _Libc()
    assert allocator._apply(lib, pool=False) == "tuned"
    assert allocator._apply(lib, pool=True) == "not installed"  # tuned: no pool
    assert lib.calls == [(allocator.M_MMAP_THRESHOLD, 32 << 20), (allocator.M_TRIM_THRESHOLD, 64 << 20)]


def test_the_default_installs_the_pool_beside_the_thresholds(monkeypatch):
    pytest.importorskip("kiln.kernels._cpu_pool")
    monkeypatch.delenv("KILN_MALLOC", raising=False)
    lib = _Libc()
    assert allocator._apply(lib, pool=False) == "tuned"
    assert lib.calls == [(allocator.M_MMAP_THRESHOLD, 32 << 20), (allocator.M_TRIM_THRESHOLD, 64 << 20)]
    assert allocator._apply(lib, pool=True) == "pool"  # what every plan of this process does anyway
    assert allocator.memory_stats()["mapped_bytes"] >= 0


def test_leaves_the_allocator_alone_when_asked_or_not_glibc(monkeypatch):
    lib = _Libc()
    monkeypatch.setenv("KILN_MALLOC", "system")
    assert allocator._apply(lib, pool=False) == "system" and lib.calls == []
    assert allocator._apply(lib, pool=True) == "system"
    monkeypatch.setenv("KILN_MALLOC", "tuned")
    lib = _Libc(glibc=False)
    assert allocator._apply(lib, pool=False) == "unavailable" and lib.calls == []


def test_a_bad_setting_is_a_kiln_error(monkeypatch):
    monkeypatch.setenv("KILN_MALLOC", "jemalloc")
    with pytest.raises(KilnError, match="KILN_MALLOC"):
        settings()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_once_per_process_on_this_machine():
    first = allocator.tune_allocator()
    assert first in ("pool", "tuned", "system", "unavailable")
    assert allocator.tune_allocator() == first
    after = allocator.tune_allocator(pool=True)  # as a host plan asks
    assert after == ("pool" if settings().malloc == "pool" else first)
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        pytest.skip("not glibc")
    assert after in ("pool", "tuned", "system")

"""Per-step profiles (runtime/profile.py): each step's wall time and the CPU time of the
calling thread and of the process's other threads. Nothing here depends on how fast
anything ran: only that the clocks count the threads they name."""
import sys
import threading
import time

import pytest
import torch
from torch import nn

import kiln
from kiln.runtime.profile import ThreadClocks, profile_plan, thread_split

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU clocks are read on Linux")


def _spin(ns: int) -> int:
    """Busy work on this thread until its own CPU clock advanced ``ns``; returns the advance."""
    t0 = time.thread_time_ns()
    while time.thread_time_ns() - t0 < ns:
        sum(range(1000))
    return time.thread_time_ns() - t0


@linux
def test_clocks_count_the_caller_and_the_other_threads_apart():
    clocks = ThreadClocks()
    done, spun, release = threading.Event(), threading.Event(), threading.Event()
    worked = []
    # the worker stays alive until the second read: an exited thread's clock counts nothing
    worker = threading.Thread(target=lambda: (done.wait(), worked.append(_spin(20_000_000)), spun.set(),
                                              release.wait()))
    worker.start()
    clocks.refresh()  # the worker exists now: its clock is read by id
    c0 = clocks.read()
    mine = _spin(10_000_000)
    done.set()
    spun.wait()
    c1 = clocks.read()
    release.set()
    worker.join()
    # each thread's own clock advanced by what it measured itself; the caller's count has
    # its own work in it, the others' count has the worker's (plus whatever else ran)
    assert c1[0] - c0[0] >= mine
    assert c1[1] - c0[1] >= worked[0]


@linux
def test_a_thread_that_ended_counts_nothing_more():
    clocks = ThreadClocks()
    t = threading.Thread(target=lambda: None)
    t.start()
    clocks.refresh()
    t.join()
    before, after = clocks.read(), clocks.read()
    assert after[1] >= before[1] >= 0


def test_profile_records_each_steps_cpu_per_thread():
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    fast = kiln.compile(m, (x,))
    plan = fast.compiled[0].plan
    steps = profile_plan(plan, [x], runs=2)
    assert len(steps) == len(plan.steps)
    if not sys.platform.startswith("linux"):
        assert all(s.cpu_caller is None and s.cpu_others is None for s in steps)
        assert thread_split(steps) == {}
        return
    assert all(s.cpu_caller >= 0 and s.cpu_others >= 0 for s in steps)
    split = thread_split(steps)
    assert sum(n for n, _, _ in split.values()) == len(steps)
    assert sum(mine for _, mine, _ in split.values()) == pytest.approx(sum(s.cpu_caller for s in steps))
    assert sum(rest for _, _, rest in split.values()) == pytest.approx(sum(s.cpu_others for s in steps))

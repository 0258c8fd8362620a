"""MKL VML's first-call dispatch race (pytorch/pytorch#188792): Kiln settles every VML
function's kernel on one thread before it measures or runs anything in parallel."""
import subprocess
import sys

import pytest
import torch

from kiln.ir import GraphBuilder, OpKind
from kiln.kernels import vml_dispatch
from kiln.runtime.plan import build_plan


def test_building_a_plan_settles_vml_dispatch(monkeypatch):
    monkeypatch.setattr(vml_dispatch, "_done", False)
    called = []
    monkeypatch.setattr(vml_dispatch, "VML_OPS", (lambda x: called.append(x.dtype),))
    b = GraphBuilder("g")
    x = b.input("x", (4, 8))
    build_plan(b.build([b.add(OpKind.TANH, x)]), "reference")
    assert called == list(vml_dispatch.VML_DTYPES)  # one call per precision, on this thread
    assert not vml_dispatch.resolve_vml_dispatch()  # and only once per process


def test_every_vml_op_takes_the_warm_up_value():
    for dt in vml_dispatch.VML_DTYPES:
        x = torch.full((1,), 0.5, dtype=dt)
        for op in vml_dispatch.VML_OPS:
            assert torch.isfinite(op(x)).all(), op


# A fresh process's first parallel call of one VML function, then the same call again: equal
# only when the dispatch was settled first. Without resolve_vml_dispatch about one process
# in five returned a less accurate chunk on this machine (the race needs two threads).
_FIRST_CALL = """
import sys, torch
from kiln.kernels.vml_dispatch import resolve_vml_dispatch, VML_OPS, VML_DTYPES
torch.set_num_threads(2)
resolve_vml_dispatch()
k = int(sys.argv[1])
op, dt = VML_OPS[k % len(VML_OPS)], VML_DTYPES[k // len(VML_OPS) % len(VML_DTYPES)]
x = torch.rand(8192, generator=torch.Generator().manual_seed(k), dtype=dt) * 0.9 + 0.05
first = op(x)
print(op.__name__, dt, "equal" if torch.equal(first, op(x)) else "differs")
"""


@pytest.mark.slow
def test_first_parallel_call_in_a_fresh_process_matches_the_next():
    results = [subprocess.run([sys.executable, "-c", _FIRST_CALL, str(k)], capture_output=True, text=True,
                              timeout=120, check=True).stdout.strip() for k in range(24)]
    assert all(r.endswith("equal") for r in results), [r for r in results if not r.endswith("equal")]

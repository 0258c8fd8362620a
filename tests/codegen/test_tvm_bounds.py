"""Generated TensorIR kernels read only inside their input buffers.

A concat or pad evaluates, per output element, only the piece that element comes from; a
kernel that also reads the other pieces at unclamped indices reads before or past their
buffers. Random inputs rarely show it (the read lands in other live memory and its value is
discarded), so here every input starts right after an inaccessible page: a read before a
buffer's start kills the process. Each case runs in a subprocess so that a crash is a
failure, not the end of the test session; the four cases share one subprocess (one import of
torch and TVM), which names each case before running it so a crash says which one.
"""
import subprocess
import sys

import pytest

pytest.importorskip("tvm")

SCRIPT = r'''
import ctypes, mmap, sys
import numpy as np
import torch
from kiln.ir import GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.passes.partition import KernelGroup
from kiln.codegen.schedules_cpu import tune_space
from kiln.codegen.tvm_runtime import GeneratedKernel
from kiln.runtime.module_cache import build_in_memory
from kiln.target import host_cpu

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
KEEP = []


def guarded(shape):
    """A float32 tensor that starts right after an inaccessible page."""
    n = int(np.prod(shape))
    buf = mmap.mmap(-1, PAGE + (4 * n + PAGE - 1) // PAGE * PAGE)
    assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(buf)), PAGE, 0) == 0
    KEEP.append(buf)
    t = torch.from_numpy(np.frombuffer(buf, dtype=np.float32, count=n, offset=PAGE).reshape(shape))
    t.copy_(torch.randn(shape))
    return t


def run_case(case):
    b = GraphBuilder(case)
    if case == "concat":
        x, y = b.input("x", (4, 3, 64)), b.input("y", (4, 5, 64))
        out = b.add(OpKind.CONCAT, b.add(OpKind.RELU, x), b.add(OpKind.EXP, y), attrs=A.AxisAttrs(1))
        ref = lambda x, y: torch.cat([torch.relu(x), torch.exp(y)], 1)
    elif case == "reshape_concat":
        x, y = b.input("x", (4, 3, 64)), b.input("y", (4, 320))
        r = b.add(OpKind.RESHAPE, y, attrs=A.ShapeAttrs((4, 5, 64)))
        out = b.add(OpKind.CONCAT, b.add(OpKind.RELU, x), b.add(OpKind.EXP, r), attrs=A.AxisAttrs(1))
        ref = lambda x, y: torch.cat([torch.relu(x), torch.exp(y.reshape(4, 5, 64))], 1)
    elif case == "pad_rows":  # IR pads are (before, after) per dim, first dim first
        x = b.input("x", (4, 6, 64))
        out = b.add(OpKind.PAD, b.add(OpKind.EXP, x), attrs=A.PadAttrs((0, 0, 3, 2, 0, 0)))
        ref = lambda x: torch.nn.functional.pad(torch.exp(x), (0, 0, 3, 2))
    else:
        x = b.input("x", (4, 6, 64))
        out = b.add(OpKind.PAD, b.add(OpKind.EXP, x), attrs=A.PadAttrs((0, 0, 0, 0, 5, 3)))
        ref = lambda x: torch.nn.functional.pad(torch.exp(x), (5, 3))
    g = b.build([out])
    group = KernelGroup(0, "injective", list(g.nodes), list(g.inputs), list(g.outputs))
    cfg = tune_space(group, 1).default()
    kernel = GeneratedKernel(build_in_memory(group, cfg, host_cpu(), 1), group, case, cfg, True)
    xs = [guarded(tuple(v.type.shape)) for v in g.inputs]
    got = kernel(xs)
    return "match" if torch.allclose(got, ref(*xs), atol=1e-5) else "mismatch"


for case in sys.argv[1:]:
    print("running", case, flush=True)
    print(case, run_case(case), flush=True)
'''


CASES = ["concat", "reshape_concat", "pad_rows", "pad_columns"]


def test_generated_kernels_read_only_inside_their_inputs():
    out = subprocess.run([sys.executable, "-c", SCRIPT, *CASES], capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, f"exit {out.returncode} during {lines[-1] if lines else 'start-up'} " \
                                f"(a negative exit is a signal: -11 a read outside a buffer)\n{out.stderr[-2000:]}"
    assert [l for l in lines if not l.startswith("running ")] == [f"{c} match" for c in CASES]

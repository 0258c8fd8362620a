"""The CUDA C renderer's kernels, checked numerically on this machine without a GPU: the
generated source is compiled as host C++ by g++ under a small shim (``__global__`` drops
away, blockIdx/threadIdx are loop variables), run over every thread of the grid, and
compared with the reference executor. nvcc compiles the same source for sm_80/sm_90 in
test_ahead.py; this checks what it computes."""
import ctypes
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

from kiln.codegen import cuda as cgen
from kiln.codegen.walk import Unsupported
from kiln.ir import DType, GraphBuilder, Layout, LayoutKind, OpKind
from kiln.ir import attrs as A
from kiln.passes.partition import GroupKind, partition
from kiln.runtime.cuda_steps import empty_like_value
from kiln.runtime.plan import run_all

SHIM = r"""
#include <cmath>
#include <cstring>
#include <algorithm>
#define __global__
#define __restrict__
struct KilnDim3 { long long x = 0, y = 0, z = 0; };
static KilnDim3 blockIdx, threadIdx, blockDim;
using std::max; using std::min;
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
"""

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


def _run_host(rendered, ins):
    outs = [empty_like_value(v, "cpu") for v in rendered.outputs]
    types = [cgen.C_TYPES[v.type.dtype] for v in rendered.inputs + rendered.outputs]
    args = ", ".join(f"({'const ' if i < len(rendered.inputs) else ''}{t}*)p[{i}]" for i, t in enumerate(types))
    launcher = (f'extern "C" void kiln_run(void** p, long long n) {{\n  blockDim.x = 256;\n'
                f'  for (blockIdx.x = 0; blockIdx.x * 256 < n; ++blockIdx.x)\n'
                f'    for (threadIdx.x = 0; threadIdx.x < 256; ++threadIdx.x) {rendered.name}({args}, n);\n}}\n')
    with tempfile.TemporaryDirectory() as d:
        src, lib = os.path.join(d, "k.cpp"), os.path.join(d, "k.so")
        with open(src, "w") as f:
            f.write(SHIM + rendered.source.replace('extern "C" ', "static ") + launcher)
        p = subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-std=c++17", "-o", lib, src], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr[-3000:] + "\n" + rendered.source
        tensors = [t.contiguous() if t.dim() != 4 else t for t in ins] + outs
        ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
        ctypes.CDLL(lib).kiln_run(ptrs, ctypes.c_longlong(rendered.numel))
    return outs


def _check(graph, inputs):
    p = partition(graph)
    env = ref = run_all(graph, list(inputs))  # every value, by the reference kernels
    checked = 0
    for g in p.groups:
        if g.kind not in (GroupKind.INJECTIVE, GroupKind.REDUCTION):
            continue
        try:
            rendered = cgen.render_group(g)
        except Unsupported:  # a reduction anchor: Triton's
            continue
        for r in rendered:
            outs = _run_host(r, [env[v] for v in r.inputs])
            for v, o in zip(r.outputs, outs):
                exp = ref[v]
                assert o.shape == exp.shape and o.stride() == exp.contiguous(
                    memory_format=torch.channels_last if v.type.layout.kind is LayoutKind.CHANNELS_LAST
                    else torch.contiguous_format).stride()
                if o.dtype.is_floating_point:
                    assert torch.allclose(o, exp, rtol=1e-5, atol=1e-5), (o - exp).abs().max()
                else:
                    assert torch.equal(o, exp)
                checked += 1
    assert checked >= 1
    return checked


def test_elementwise_broadcast_masks_and_casts():
    b = GraphBuilder()
    x = b.input("x", (4, 1, 8))
    y = b.input("y", (3, 8))
    s = b.add(OpKind.ADD, x, y)
    m = b.add(OpKind.GT, s, b.const(torch.tensor(0.2)))
    w = b.add(OpKind.WHERE, m, b.add(OpKind.EXP, s), b.add(OpKind.NEG, s))
    f = b.add(OpKind.CAST, m, attrs=A.CastAttrs(DType.FLOAT32))
    c = b.add(OpKind.CLAMP, b.add(OpKind.ADD, w, f), attrs=A.ClampAttrs(-0.5, 2.0))
    g = b.add(OpKind.GELU, c, attrs=A.GeluAttrs(A.GeluApprox.NONE))
    t = b.add(OpKind.GELU, b.add(OpKind.SIGMOID, g), attrs=A.GeluAttrs(A.GeluApprox.TANH))
    assert _check(b.build([t, m]), [torch.randn(4, 1, 8), torch.randn(3, 8)]) == 2


def test_movement_and_gather():
    b = GraphBuilder()
    x = b.input("x", (2, 3, 4, 5))
    p = b.add(OpKind.PERMUTE, x, attrs=A.PermuteAttrs((0, 2, 1, 3)))
    r = b.add(OpKind.RESHAPE, p, attrs=A.ShapeAttrs((8, 15)))
    sl = b.add(OpKind.SLICE, r, attrs=A.SliceAttrs(1, 1, 13, 3))
    c = b.add(OpKind.CONCAT, sl, b.add(OpKind.TANH, sl), attrs=A.AxisAttrs(1))
    pd = b.add(OpKind.PAD, c, attrs=A.PadAttrs((1, 0, 2, 3), A.PadMode.CONSTANT, -1.0))
    table = b.const(torch.randn(10, 13))
    ids = b.input("ids", (3,), DType.INT64)
    e = b.add(OpKind.TAKE, table, ids, attrs=A.AxisAttrs(0))
    out = b.add(OpKind.ADD, b.add(OpKind.SLICE, pd, attrs=A.SliceAttrs(0, 0, 3)), e)
    _check(b.build([out]), [torch.randn(2, 3, 4, 5), torch.tensor([4, -1, 0])])


def test_channels_last_and_batch_norm():
    b = GraphBuilder()
    x = b.input("x", (2, 3, 4, 5))
    cl = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST)))
    bn = b.add(OpKind.BATCH_NORM, cl, b.const(torch.randn(3)), b.const(torch.rand(3) + 0.5),
               b.const(torch.randn(3)), b.const(torch.randn(3)), attrs=A.BatchNormAttrs(1e-5))
    y = b.add(OpKind.RELU, bn)
    _check(b.build([b.add(OpKind.TO_LAYOUT, y, attrs=A.LayoutAttrs(Layout()))]), [torch.randn(2, 3, 4, 5)])


def test_inverse_trigonometry_atan2_and_round():
    b = GraphBuilder()
    u = b.input("u", (4, 9))  # inside (-1, 1)
    v = b.input("v", (4, 9))  # above 1
    h = b.input("h", (4, 9))  # multiples of 0.5: rounding ties go to even
    t = b.add(OpKind.ADD, b.add(OpKind.ACOS, u), b.add(OpKind.ASIN, u))
    t = b.add(OpKind.ADD, t, b.add(OpKind.MUL, b.add(OpKind.ATAN, v), b.add(OpKind.ATANH, u)))
    t = b.add(OpKind.SUB, t, b.add(OpKind.DIV, b.add(OpKind.ACOSH, v), b.add(OpKind.ASINH, v)))
    t = b.add(OpKind.ADD, b.add(OpKind.ATAN2, t, v), b.add(OpKind.ROUND, h))
    ins = [torch.rand(4, 9) * 1.9 - 0.95, torch.rand(4, 9) * 3 + 1, torch.arange(-18, 18).reshape(4, 9) / 2]
    assert _check(b.build([t]), ins) >= 1

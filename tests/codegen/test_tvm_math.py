"""The generated kernels' float32 exp / tanh / erf / sigmoid (``kiln.codegen.tvm_math``): within a
few ulp of the float64 reference over the whole input range, torch's NaN and inf behaviour at
the edges, no per-lane libm call left in the compiled code, and TVM's own functions where the
forms are not used (deep nesting)."""
import subprocess

import pytest
import torch

pytest.importorskip("tvm")

from kiln.codegen.schedules_cpu import schedule_group  # noqa: E402
from kiln.ir import DType, GraphBuilder, OpKind  # noqa: E402
from kiln.ir import attrs as A  # noqa: E402
from kiln.codegen import tvm_runtime  # noqa: E402
from kiln.runtime import module_cache  # noqa: E402
from kiln.passes.partition import KernelGroup  # noqa: E402
from kiln.target import host_cpu  # noqa: E402

EPS = torch.finfo(torch.float32).eps
EDGES = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 88.72, 88.73, 89.0, -87.3, -87.4, -103.0, -104.0,
         1e30, -1e30, 7.9, -7.9, 4.0, -4.0, 1e-8, -1e-8]
OPS = [(OpKind.EXP, None, torch.exp), (OpKind.TANH, None, torch.tanh), (OpKind.ERF, None, torch.erf),
       (OpKind.SIGMOID, None, torch.sigmoid), (OpKind.SILU, None, torch.nn.functional.silu),
       (OpKind.GELU, A.GeluAttrs(), torch.nn.functional.gelu),
       (OpKind.GELU, A.GeluAttrs(A.GeluApprox.TANH), lambda t: torch.nn.functional.gelu(t, approximate="tanh"))]


def _inputs() -> torch.Tensor:
    return torch.cat([torch.linspace(-120, 120, 100_001), torch.linspace(-10, 10, 100_001),
                      torch.logspace(-30, 1, 500), -torch.logspace(-30, 1, 500), torch.tensor(EDGES)])


def _group(graph) -> KernelGroup:
    return KernelGroup(0, "injective", list(graph.nodes), list(graph.inputs), list(graph.outputs))


def _kernel(op, attrs, shape):
    b = GraphBuilder(op.value)
    x = b.input("x", shape, DType.FLOAT32)
    group = _group(b.build([b.add(op, x, attrs=attrs)]))
    config = schedule_group.tune_space.default()
    return tvm_runtime.GeneratedKernel(module_cache.build_in_memory(group, config, host_cpu(), 1), group, "test", config,
                                     True)


@pytest.mark.parametrize("op,attrs,ref", OPS, ids=[f"{o.value}{'-' + a.approximate.value if a else ''}"
                                                   for o, a, _ in OPS])
def test_float32_math_matches_float64_reference(op, attrs, ref):
    x = _inputs()
    y = _kernel(op, attrs, tuple(x.shape))([x])
    want32 = ref(x)  # torch's own float32 result: NaN and inf where it has them
    want = ref(x.double())
    assert torch.equal(torch.isnan(y), torch.isnan(want32))
    inf = torch.isinf(want32)
    assert torch.equal(y[inf], want32[inf])
    ok = torch.isfinite(want32)
    err = (y[ok].double() - want[ok]).abs()
    tol = 8 * EPS * want[ok].abs() + 1e-6  # a few ulp, or 1e-6 absolute near zero crossings
    worst = int((err - tol).argmax())
    assert bool((err <= tol).all()), f"x={x[ok][worst].item()}: got {y[ok][worst].item()}, want {want[ok][worst].item()}"


def _undefined_math(group, tmp_path) -> set:
    from kiln.codegen import tvm as tvm_codegen

    so = tmp_path / "group.so"
    tvm_codegen.build(group, schedule_group.tune_space.default(), host_cpu(), 1).export_library(str(so))
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True)
    names = {line.split()[-1].split("@")[0] for line in undefined.stdout.splitlines() if line.strip()}
    return names & {"expf", "tanhf", "erff", "exp", "tanh", "erf"}


def test_no_libm_call_per_lane(tmp_path):
    # TVM's own exp/tanh/erf become one libm call per vector lane (expf, tanhf, erff)
    b = GraphBuilder("three")
    x = b.input("x", (64, 256), DType.FLOAT32)
    outs = [b.add(OpKind.GELU, x, attrs=A.GeluAttrs()), b.add(OpKind.TANH, b.add(OpKind.SIGMOID, x)),
            b.add(OpKind.EXP, x)]
    assert not _undefined_math(_group(b.build(outs)), tmp_path)


def test_deep_nesting_keeps_tvm_functions_and_numbers(tmp_path):
    # nested past MAX_VECTOR_MATH_DEPTH the forms made compile time grow steeply: TVM's own
    # functions then, with the same results
    from kiln.codegen import tvm as tvm_codegen

    b = GraphBuilder("deep")
    y = b.input("x", (64, 256), DType.FLOAT32)
    for _ in range(tvm_codegen.MAX_VECTOR_MATH_DEPTH + 1):
        y = b.add(OpKind.TANH, y)
    group = _group(b.build([y]))
    assert _undefined_math(group, tmp_path)  # TVM lowers its tanh through libm expf
    x = torch.randn(64, 256) * 3
    config = schedule_group.tune_space.default()
    kernel = tvm_runtime.GeneratedKernel(module_cache.build_in_memory(group, config, host_cpu(), 1), group, "test", config,
                                       True)
    assert torch.allclose(kernel([x]), x.tanh().tanh().tanh(), atol=1e-6)

"""Every kernel Kiln generates for the example models with target cuda compiles to cubin
for sm_80 and sm_90 (Triton's bundled ptxas for Triton kernels, nvcc for CUDA C), on this
machine without a GPU. Identical kernels are built once (per-plan deduplication and
Triton's own cache, here a fresh directory for the session). The default run uses small
model configurations (the distinct kernels are the same kinds; shapes only change the
launch arguments); the full-size models are marked slow."""
import os
import tempfile

import pytest

from kiln.codegen.cuda import nvcc
from kiln.frontends.torch_export import export_program, from_exported
from kiln.models import get
from kiln.options import CompileOptions
from kiln.passes.pipeline import run_pipeline
from kiln.runtime.cuda_run import build_ahead, record_launches
from kiln.runtime.cuda_steps import build_gpu_plan
from kiln.kernels.triton.launch import dedupe
from kiln.target import cuda

SMALL = {"resnet18": dict(image=32), "bert": dict(layers=2, hidden=64, heads=2, ffn=128, seq=16, vocab=100),
         "lstm": dict(batch=4, seq=6, hidden=32)}
# library kernels each model must use (a regression would fall back to torch silently)
EXPECTED = {"resnet18": {"triton.conv2d", "triton.max_pool2d", "triton.linear", "gen.reduction"},
            "bert": {"triton.linear", "triton.attention", "triton.layer_norm", "gen.reduction", "gen.elementwise"},
            "lstm": {"triton.linear", "triton.lstm", "gen.elementwise"}}


@pytest.fixture(scope="module", autouse=True)
def _fresh_triton_cache():
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-triton-cache-")
    yield
    if old is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = old


def _plan(name, **kw):
    model, inputs = get(name, **kw)
    graph = from_exported(export_program(model, tuple(inputs), {}), name).graph
    result = run_pipeline(graph, CompileOptions.parse(target="cuda"))  # as kiln.compile passes it
    return build_gpu_plan(result.graph, result.partition, cuda("sm_90"), ahead=False)


def _check(name, plan):
    assert EXPECTED[name] <= set(plan.kernel_names), plan.kernel_names
    assert not plan.torch_ops, plan.torch_ops
    distinct = len(dedupe(record_launches(plan)))
    cuda_c = sum(1 for g in plan.runner.generated if g.cuda_r is not None)
    report = build_ahead(plan, (80, 90))
    assert report.failures == []
    for sm in (80, 90):
        c = report.counts(sm)
        print(f"{name} sm_{sm}: {c}")
        assert c["triton"] == distinct and c["triton_failed"] == 0
        assert all(b.cubin_bytes > 0 for b in report.triton[sm])
        assert c["cuda_c"] == cuda_c and c["cuda_c_failed"] == 0
        if cuda_c:
            assert len(report.cubins[sm]) > 0
    return distinct, cuda_c


@pytest.mark.skipif(nvcc() is None, reason="nvcc is not installed")
@pytest.mark.parametrize("name", list(SMALL))
def test_example_model_kernels_compile_to_cubin(name):
    distinct, cuda_c = _check(name, _plan(name, **SMALL[name]))
    assert distinct >= {"resnet18": 8, "bert": 9, "lstm": 3}[name]
    assert cuda_c >= 1


@pytest.mark.slow
@pytest.mark.skipif(nvcc() is None, reason="nvcc is not installed")
@pytest.mark.parametrize("name", list(SMALL))
def test_full_size_model_kernels_compile_to_cubin(name):
    _check(name, _plan(name))


def test_inverse_trigonometry_and_round_compile_for_sm_90():
    # Triton has these from CUDA's libdevice, which its interpreter cannot run: compiling is the check here
    from kiln.ir import GraphBuilder, OpKind

    b = GraphBuilder("trig")
    x, y = b.input("x", (8, 40)), b.input("y", (8, 40))
    t = b.add(OpKind.ADD, b.add(OpKind.ACOS, x), b.add(OpKind.ASIN, x))
    t = b.add(OpKind.MUL, t, b.add(OpKind.ADD, b.add(OpKind.ATAN, y), b.add(OpKind.ATANH, x)))
    t = b.add(OpKind.ADD, t, b.add(OpKind.SUB, b.add(OpKind.ACOSH, y), b.add(OpKind.ASINH, y)))
    t = b.add(OpKind.ROUND, b.add(OpKind.ATAN2, t, y))
    result = run_pipeline(b.build([t]), CompileOptions.parse(target="cuda"))
    plan = build_gpu_plan(result.graph, result.partition, cuda("sm_90"), ahead=False)
    assert "gen.elementwise" in set(plan.kernel_names), plan.kernel_names
    report = build_ahead(plan, (90,))
    assert report.failures == []
    c = report.counts(90)
    assert c["triton"] >= 1 and c["triton_failed"] == 0 and c["cuda_c_failed"] == 0


# kept out of `make test`'s time budget on 2 cores: cubin builds of the example models' kernels: `make test-slow`, which CI runs
pytestmark = pytest.mark.slow

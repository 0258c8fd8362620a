"""The cuda strategy around the one plan structure (runtime/cuda_run.py) and the tuning
budget Triton kernels read (kernels/triton/tuning.py), checked without a GPU: fake steps
record what they are given."""
from types import SimpleNamespace

import pytest
import torch

import kiln
from kiln.codegen.autotune import Space
from kiln.ir import GraphBuilder, OpKind
from kiln.kernels.triton import launch, tuning
from kiln.runtime.cuda_run import CudaRunner
from kiln.runtime.plan import KernelFailure, Unit, assemble
from kiln.target import cuda


def _plan(fn, tune="fast"):
    """x + c -> relu, both steps running ``fn``, under a CudaRunner."""
    b = GraphBuilder("two_steps")
    x = b.input("x", (4,))
    s = b.add(OpKind.ADD, x, b.const(torch.ones(4)), scope="block.add")
    y = b.add(OpKind.RELU, s)
    g = b.build([y])
    units = [Unit(f"fake.{n.op.value}", fn, n.attrs, tuple(n.inputs), tuple(n.outputs), n) for n in g.nodes]
    return assemble(g, cuda("sm_90"), units, runner=CudaRunner([], tune))


@pytest.fixture
def runnable_on_cpu(monkeypatch):
    """As under Triton's interpreter: the runner lets CPU tensors through."""
    monkeypatch.setattr(launch, "interpreting", lambda: True)


def test_steps_run_in_the_plans_tuning_budget_with_the_constants(runnable_on_cpu):
    seen = []

    def fn(ins, attrs):
        seen.append(tuning._BUDGET.get())
        return ins[0] + ins[1] if len(ins) == 2 else torch.relu(ins[0])

    plan = _plan(fn, tune="max")
    x = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    (out,) = plan.run([x])
    torch.testing.assert_close(out, torch.relu(x + 1))
    assert seen == ["max", "max"] and tuning._BUDGET.get() == "fast"  # set for the run only


def test_a_failing_step_is_named_like_on_the_cpu(runnable_on_cpu):
    def fn(ins, attrs):
        raise ValueError("deliberate")

    with pytest.raises(KernelFailure, match=r"kernel fake\.add for add \(block\.add\) failed: deliberate") as e:
        _plan(fn).run([torch.zeros(4)])
    assert isinstance(e.value, kiln.KilnError) and isinstance(e.value.__cause__, ValueError)


def test_without_a_gpu_the_plan_refuses_to_run():
    if torch.cuda.is_available():
        pytest.skip("checks the behaviour without a GPU")
    with pytest.raises(kiln.KilnError, match="needs an NVIDIA GPU"):
        _plan(lambda ins, attrs: ins[0]).run([torch.zeros(4)])


def test_cuda_graphs_setting_comes_from_the_environment_settings(monkeypatch):
    monkeypatch.setenv("KILN_CUDA_GRAPHS", "0")
    assert CudaRunner([]).graphs is False
    monkeypatch.delenv("KILN_CUDA_GRAPHS")
    assert CudaRunner([]).graphs is True


def test_choose_config_tunes_within_the_innermost_budget(monkeypatch):
    budgets = []

    def fake_tune(key, space, measure, budget):
        budgets.append(budget)
        return SimpleNamespace(config=space.default())

    monkeypatch.setattr(tuning, "tune", fake_tune)
    monkeypatch.setattr(tuning, "on_device", lambda *t: True)
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "target_key", lambda: "cuda:test")
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    space = Space.of(BLOCK=[64, 128])
    tuning.choose_config("k", space, "sig", None)
    with tuning.tuning_budget("none"):
        tuning.choose_config("k", space, "sig", None)
        with tuning.tuning_budget(2.0):
            tuning.choose_config("k", space, "sig", None)
        tuning.choose_config("k", space, "sig", None)  # decided for this budget already
    assert budgets == ["fast", "none", 2.0]

"""The end-to-end check of approximate kernels (runtime/accuracy_guard.py, driver._guard_accuracy):
a plan that uses a Winograd convolution is kept only if the whole model agrees with the
reference kernels; otherwise the compile builds it again without them and says why."""
import pytest
import torch
from torch import nn

import kiln
from kiln.runtime import accuracy_guard
from kiln.runtime.plan import build_plan


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()


@pytest.fixture
def winograd_first(monkeypatch, tmp_path):
    """No timing: the first accepting candidate wins; with oneDNN's convolution excluded that
    is a Winograd kernel (registered before the reference). Caches off."""
    monkeypatch.setenv("KILN_KERNEL_CHOICE", "first")
    monkeypatch.setenv("KILN_CACHE", "0")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))


def _compile(x):
    return kiln.compile(_model(), (x,), exclude_kernels=["cpu.onednn_conv"], codegen=False)


def test_approximate_kernels_within_the_bound_are_kept(winograd_first):
    x = torch.randn(1, 8, 16, 16)
    c = _compile(x)
    used = [k for k in c.report.kernels if k.startswith("cpu.winograd")]
    if not used:
        pytest.skip("this CPU offers no Winograd kernel for the convolutions")
    assert "whole model within" in c.report.accuracy and "bound 1e-04" in c.report.accuracy
    torch.testing.assert_close(c(x), _model()(x), atol=1e-4, rtol=1e-4)


def test_approximate_kernels_that_drift_end_to_end_are_not_kept(winograd_first, monkeypatch):
    x = torch.randn(1, 8, 16, 16)
    if not [k for k in _compile(x).report.kernels if k.startswith("cpu.winograd")]:
        pytest.skip("this CPU offers no Winograd kernel for the convolutions")
    seen = []

    def drifting(plan, reference, sizes=None):  # as if the errors had added up past the bound
        seen.append(sorted(plan.kernel_names))
        return 3e-4

    monkeypatch.setattr(accuracy_guard, "worst_relative_error", drifting)
    c = _compile(x)
    assert seen and any(k.startswith("cpu.winograd") for k in seen[0])
    assert not any(k.startswith("cpu.winograd") for k in c.report.kernels), c.report.kernels
    assert "not used" in c.report.accuracy and "3.0e-04" in c.report.accuracy
    assert "accuracy:" in str(c.report)
    torch.testing.assert_close(c(x), _model()(x), atol=1e-4, rtol=1e-4)


def test_worst_relative_error_is_zero_against_itself_and_sees_a_changed_weight():
    x = torch.randn(1, 8, 16, 16)
    a, b = _model(), _model()
    with torch.no_grad():
        b[0].weight.mul_(1 + 1e-3)
    ga = kiln.compile(a, (x,), codegen=False).compiled[0].graph
    gb = kiln.compile(b, (x,), codegen=False).compiled[0].graph
    ref = build_plan(ga, "reference")
    assert accuracy_guard.worst_relative_error(build_plan(ga, "reference"), ref) == 0.0
    assert 1e-5 < accuracy_guard.worst_relative_error(build_plan(gb, "reference"), ref) < 1e-2


def test_a_bf16_compile_is_held_to_the_bf16_bound(winograd_first):
    """precision="bf16": the reference kernels round every bf16 value too, so the bound is
    BF16_REL_TOL; the bf16 Winograd kernel (where AVX512-BF16 runs it) is kept within it."""
    from kiln import _C

    x = torch.randn(1, 8, 16, 16)
    c = kiln.compile(_model(), (x,), precision="bf16", exclude_kernels=["cpu.onednn_conv"], codegen=False)
    assert accuracy_guard.bound_for(c.compiled[0].graph) == accuracy_guard.BF16_REL_TOL
    if not _C.winograd_bf16_supported():
        pytest.skip("no bf16 Winograd kernel on this CPU")
    assert c.report.kernels.get("cpu.winograd2_conv_bf16") == 2
    assert "whole model within" in c.report.accuracy and "bound 1e-02" in c.report.accuracy
    ref = _model()(x)
    assert float((c(x) - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


def test_fp32_graphs_keep_the_fp32_bound():
    g = kiln.compile(_model(), (torch.randn(1, 8, 16, 16),), codegen=False).compiled[0].graph
    assert accuracy_guard.bound_for(g) == accuracy_guard.REL_TOL

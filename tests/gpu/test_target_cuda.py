"""kiln.compile(..., target="cuda") on a machine without a GPU: builds every kernel ahead of
time for the target SM, then refuses to run with a clear KilnError."""
import pytest
import torch

import kiln
from kiln.models import get


@pytest.fixture(scope="module")
def compiled():
    model, inputs = get("lstm", batch=2, seq=4, hidden=16, layers=1)
    return model, inputs, kiln.compile(model, inputs, target="cuda:sm_80", tune="none")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_builds_ahead_then_raises_when_run(compiled):
    model, inputs, cm = compiled
    plan = cm.compiled[0].plan
    assert cm.target == "cuda" and plan.target.sm == 80
    ahead = plan.runner.ahead
    assert ahead is not None and ahead.sms == (80,)
    counts = ahead.counts(80)
    assert counts["triton"] >= 2 and counts["triton_failed"] == 0 and ahead.failures == []
    with pytest.raises(kiln.KilnError, match="needs an NVIDIA GPU"):
        cm(*inputs)


def test_target_is_inferred_from_the_inputs():
    model = torch.nn.Linear(4, 3)
    assert kiln.compile(model, (torch.randn(2, 4),)).target == "cpu"
    if torch.cuda.is_available():
        assert kiln.compile(model.cuda(), (torch.randn(2, 4, device="cuda"),)).target == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_gpu(compiled):
    model, inputs, _ = compiled
    model = model.cuda()
    xs = [x.cuda() for x in inputs]
    cm = kiln.compile(model, xs, tune="none")
    assert cm.target == "cuda"
    out, ref = cm(*xs), model(*xs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())

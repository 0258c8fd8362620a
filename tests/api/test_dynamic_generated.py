"""dynamic= with generated kernels: TVM kernels over symbolic sizes (one kernel for every
length) in a dynamic plan, forced to win (``KILN_GROUP_CHOICE=generated``: no timing), match
eager at odd lengths and batch sizes."""
import pytest
import torch

import kiln
from kiln import models

from conftest import max_err_ok


def _logits(out):
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])


def _tokens(batch, seq, like, vocab=100):
    return torch.randint(0, vocab, (batch, seq)), torch.ones(batch, seq, dtype=like.dtype)


@pytest.mark.parametrize("name", ["bert", "hf_bert"])
def test_generated_kernels_over_symbolic_sizes_match_eager_at_odd_lengths(name, monkeypatch):
    pytest.importorskip("tvm")
    monkeypatch.setenv("KILN_GROUP_CHOICE", "generated")  # agreeing generated kernels win, no timing
    model, inputs = getattr(models, name)(layers=2, hidden=64, heads=4, ffn=128, vocab=1000)
    fast = kiln.compile(model, inputs, dynamic=True)
    plan = fast.compiled[0].plan
    symbolic = [s for s in plan.steps if s.kernel.startswith("tvm.group.") and
                any(not v.type.is_static for v in s.fn.group.outputs)]
    assert symbolic, "no generated kernel over a symbolic size in the plan"
    with torch.no_grad():
        for batch, seq in [(1, 1), (1, 7), (2, 129), (1, 64)]:
            args = _tokens(batch, seq, inputs[1])
            ok, err, tol = max_err_ok(_logits(fast(*args)), _logits(model(*args)))
            assert ok, f"{name} {batch}x{seq}: {err} > {tol}"
    assert len(fast.compiled) == 1

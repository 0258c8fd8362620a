"""``torch.compile(model, backend="kiln")`` on models with convolutions and normalizations,
with the parameters dynamo lifts into graph inputs compiled as weights (and recompiled when
they change)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln
import kiln.api  # noqa: F401  (the spies below patch kiln.api.CompiledModel)
from kiln.bench import suite_models


def _compiled(m):
    torch._dynamo.reset()
    return torch.compile(m, backend="kiln")


def test_conv_model_compiles_through_dynamo():
    # failed with "KernelFailure: kernel reference.to_layout ... layout nhwc": the lifted conv bias
    # (a 1-D graph input) was given a channels-last layout
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    opt = _compiled(m)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), m(x))


def test_lifted_weights_are_constants_and_updates_recompile():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 6, 6)
    seen = []
    real = kiln.api.CompiledModel._compile

    def spy(self, *a, **k):
        c = real(self, *a, **k)
        seen.append(c)
        return c

    kiln.api.CompiledModel._compile = spy
    try:
        opt = _compiled(m)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), m(x))
            graph = seen[-1].graph
            # the weights are graph constants (conv + batch norm folded into one conv), not inputs
            assert len(graph.inputs) == 1 and len(graph.constants) >= 1
            assert [n.op.value for n in graph.nodes if n.op.value == "batch_norm"] == []
            n_compiles = len(seen)
            opt(x)
            assert len(seen) == n_compiles  # same weights: no recompile
            m[0].weight.mul_(-2.0)  # an in-place update: the frozen weights would be stale
            torch.testing.assert_close(opt(x), m(x))
            assert len(seen) == n_compiles + 1
            m.load_state_dict({k: torch.randn_like(v) if v.is_floating_point() else v
                               for k, v in m.state_dict().items()})
            m[1].running_var.abs_()
            torch.testing.assert_close(opt(x), m(x))
    finally:
        kiln.api.CompiledModel._compile = real


@pytest.mark.parametrize("name", ["convnextv2", "wav2vec2", "bert"])
def test_suite_models_through_dynamo(name):
    model, inputs = suite_models.build(name, quick=True)
    with torch.no_grad():
        want = model(*inputs).logits
        got = _compiled(model)(*inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_layout_pass_leaves_a_conv_bias_graph_input_alone():
    from kiln.ir import OpKind
    from kiln.passes.layout import channels_last

    fn = lambda x, w, b: torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1))  # noqa: E731
    xs = [torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)]
    fast = kiln.compile(fn, xs)
    torch.testing.assert_close(fast(*xs), fn(*xs))
    g = channels_last(fast.compiled[0].graph)
    relaid = [n.inputs[0] for n in g.nodes if n.op is OpKind.TO_LAYOUT]
    assert all(v.type.rank == 4 for v in relaid) and g.inputs[2] not in relaid


def test_dynamic_true_compiles_one_kiln_plan_for_every_size(monkeypatch):
    """Dynamo hands over symbolic sizes (SymInt inputs, fake tensors with symbolic dims) and
    Python floats as 0-d tensors (a layer norm's eps): Kiln compiles once, dims dynamic."""
    from kiln import driver, models

    compiles = []
    real = driver.compile_imported
    monkeypatch.setattr(driver, "compile_imported", lambda *a, **k: compiles.append(1) or real(*a, **k))
    model, inputs = models.bert(layers=1, hidden=32, heads=2, ffn=64, vocab=100)
    torch._dynamo.reset()
    opt = torch.compile(model, backend="kiln", dynamic=True)
    with torch.no_grad():
        for batch, seq in [(2, 8), (3, 17), (2, 129), (7, 7)]:
            args = (torch.randint(0, 100, (batch, seq)), torch.ones(batch, seq, dtype=inputs[1].dtype))
            out, ref = opt(*args), model(*args)
            out, ref = (o if isinstance(o, torch.Tensor) else o[0] for o in (out, ref))
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(compiles) == 1

    compiles.clear()
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    torch._dynamo.reset()
    opt = torch.compile(mlp, backend="kiln", dynamic=True)
    with torch.no_grad():
        for batch in (2, 5, 129):
            x = torch.randn(batch, 4)
            torch.testing.assert_close(opt(x), mlp(x))
    assert len(compiles) == 1


def test_dynamic_graph_that_cannot_stay_symbolic_compiles_per_shape(monkeypatch):
    from kiln import KilnError, KilnWarning, driver

    real = driver.import_torch

    def refuse_dynamic(*a, **k):  # stands for a model whose sizes torch.export or Kiln must fix
        if (a[5] if len(a) > 5 else k.get("dynamic")) is not None:
            raise KilnError("dims cannot vary")
        return real(*a, **k)

    monkeypatch.setattr(driver, "import_torch", refuse_dynamic)
    mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    torch._dynamo.reset()
    opt = torch.compile(mlp, backend="kiln", dynamic=True)
    with torch.no_grad(), pytest.warns(KilnWarning, match="dims cannot vary.*a plan per input shape"):
        for batch in (2, 5):
            x = torch.randn(batch, 4)
            torch.testing.assert_close(opt(x), mlp(x))

"""export_program skips torch.export's decomposition when the exported graph is functional
and fully covered by converters, and falls back to it otherwise; either way the Kiln graph
computes the same thing."""
import collections

import pytest
import torch
from torch import nn

import kiln
from kiln.frontends import torch_export as TE
from kiln.runtime.plan import build_plan


def _ops(graph):
    return collections.Counter(n.op for n in graph.nodes)


def _run(graph, xs):
    with torch.no_grad():
        return build_plan(graph, "reference").run(xs)


@pytest.mark.parametrize("name", ["resnet18", "bert", "lstm"])
def test_example_models_import_as_exported_and_match_the_decomposed_import(name):
    model, inputs = kiln.models.get(name)
    ep = TE.export_program(model, inputs)
    assert getattr(ep, "_kiln_undecomposed", False)  # no run_decompositions was needed
    direct = TE.from_exported(ep, name)
    decomposed = TE.from_exported(ep.run_decompositions({}), name)
    assert not direct.fallbacks and not decomposed.fallbacks
    assert _ops(direct.graph) == _ops(decomposed.graph)
    xs = [x for x in inputs if isinstance(x, torch.Tensor)]
    for a, b in zip(_run(direct.graph, xs), _run(decomposed.graph, xs)):
        assert torch.equal(a, b)


class InPlace(nn.Module):
    def forward(self, x):
        y = x * 2
        y.add_(1)  # an in-place op: only the decomposition (functionalization) removes it
        return torch.relu(y)


def test_in_place_ops_take_the_decomposition():
    x = torch.randn(4, 8)
    with torch.no_grad():
        raw = torch.export.export(InPlace(), (x,), strict=False)
    assert not TE.importable_as_exported(raw)
    ep = TE.export_program(InPlace(), (x,))
    assert not getattr(ep, "_kiln_undecomposed", False)
    torch.testing.assert_close(kiln.compile(InPlace(), (x,))(x), InPlace()(x))


def test_a_declined_converter_retries_on_the_decomposed_program(monkeypatch):
    model, inputs = kiln.models.get("resnet18")
    ep = TE.export_program(model, inputs)
    assert getattr(ep, "_kiln_undecomposed", False)
    # batch_norm.default appears only before decomposition (after: _native_batch_norm_legit_no_training)
    monkeypatch.setitem(TE.CONVERTERS.table, torch.ops.aten.batch_norm, lambda cx, args, kwargs, node: None)
    imp = TE.from_exported(ep, "resnet18")
    assert not imp.fallbacks  # converted from the decomposed spelling, not run as fallbacks
    xs = list(inputs)
    with torch.no_grad():
        torch.testing.assert_close(_run(imp.graph, xs)[0], model(*xs), atol=1e-4, rtol=1e-4)

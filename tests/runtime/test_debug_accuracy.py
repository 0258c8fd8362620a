"""The accuracy debugger names the first diverging pass and node."""
import torch
from torch import nn

from kiln.cli import main
from kiln.frontends.torch_export import export_program, from_exported
from kiln.ir import OpKind
from kiln.passes import pipeline
from kiln.passes.pattern import P
from kiln.runtime.debug import debug_accuracy


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) * 2)


def _graph():
    torch.manual_seed(0)
    m = Small().eval()
    x = torch.randn(4, 8)
    g = from_exported(export_program(m, (x,))).graph
    with torch.no_grad():
        return m, x, g, [m(x)]


def test_clean_pipeline_reports_no_divergence(capsys):
    _, x, g, eager = _graph()
    rep = debug_accuracy(g, [x], eager)
    assert rep.divergence is None
    assert [s for s, _ in rep.stages][0] == "import" and rep.stages[-1][0].startswith("kernels")
    assert main(["debug", "accuracy", "lstm"]) == 0
    assert "no stage diverges" in capsys.readouterr().out


def test_a_broken_pass_is_named_with_its_node(monkeypatch):
    _, x, g, eager = _graph()
    broken = pipeline.rules_pass("broken_tanh", [(P(OpKind.TANH, "x"), lambda m, rw: m["x"])])  # tanh(x) -> x
    phases = [(name, [broken] + passes if name == "fuse" else passes) for name, passes in pipeline.PHASES]
    monkeypatch.setattr(pipeline, "PHASES", phases)
    monkeypatch.setattr(pipeline, "PASS_NAMES", pipeline.PASS_NAMES + ["broken_tanh"])
    rep = debug_accuracy(g, [x], eager)
    d = rep.divergence
    assert d is not None and d.stage == "fuse/broken_tanh"
    assert d.node.startswith("mul")  # the first node fed by the rewritten value
    assert "broken_tanh" in str(rep)


def test_a_wrong_kernel_is_named(monkeypatch):
    from kiln.kernels import registry

    _, x, g, eager = _graph()
    bad = registry.Kernel(OpKind.TANH, "cpu", "cpu.bad_tanh", lambda ins, a: torch.sigmoid(ins[0]))
    monkeypatch.setitem(registry._REGISTRY, (OpKind.TANH, "cpu"), [bad])
    monkeypatch.setenv("KILN_KERNEL_CHOICE", "first")  # take the first candidate unchecked, as a buggy kernel would be
    rep = debug_accuracy(g, [x], eager, select=["-fuse"])  # keep the tanh node as it is
    d = rep.divergence
    assert d is not None and d.stage == "kernels (cpu)" and d.node.startswith("tanh")

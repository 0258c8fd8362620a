"""The whole pipeline: it fires where it should on the example models, preserves outputs
on them and on seeded random graphs, and can be selected/skipped by name."""
import random

import pytest
import torch
from torch import nn

import kiln
from kiln.options import CompileOptions
from kiln import KilnError, models
from kiln.frontends.torch_export import export_program, from_exported
from kiln.ir import OpKind
from kiln.passes.pipeline import PHASE_NAMES, run_pipeline
from kiln.passes.partition import verify_partition

from conftest import assert_same_outputs, max_err_ok


def _import(model, inputs):
    return from_exported(export_program(model, inputs)).graph


@pytest.mark.parametrize("name", ["resnet18", "bert", "hf_bert", "lstm", "gru"])
def test_pipeline_preserves_outputs_and_fires(name):
    model, inputs = models.get(name)
    g = _import(model, inputs)
    res = run_pipeline(g, verify_each=True)
    verify_partition(res.partition)
    assert_same_outputs(g, res.graph, list(inputs))
    out = res.graph
    if name == "resnet18":
        assert out.count(OpKind.BATCH_NORM) == 0 and g.count(OpKind.BATCH_NORM) == 20
        assert out.count(OpKind.RELU) == 0 and out.count(OpKind.ADD) == 0  # all in conv epilogues
        assert out.count(OpKind.TO_LAYOUT) == 2
    if "bert" in name:
        assert out.count(OpKind.ATTENTION) == 12
        assert out.count(OpKind.GELU) == 0  # fused into the FFN's first linear
    if name in ("lstm", "gru"):
        rnn = OpKind.LSTM if name == "lstm" else OpKind.GRU
        # one op per layer, each projecting its own input (the CPU kernels choose how)
        layers = [n for n in out.nodes if n.op is rnn]
        assert len(layers) == 2 and not any(n.attrs.proj_hoisted for n in layers)
        assert layers[1].inputs[0] is layers[0].outputs[0]
        # for cuda: one projection GEMM per layer, feeding the recurrence directly
        cuda = run_pipeline(g, options=CompileOptions.parse(target="cuda")).graph
        assert_same_outputs(g, cuda, list(inputs))
        producers = {o: n for n in cuda.nodes for o in n.outputs}
        layers = [n for n in cuda.nodes if n.op is rnn]
        assert len(layers) == 2 and all(n.attrs.proj_hoisted for n in layers)
        assert all(producers[n.inputs[0]].op is OpKind.LINEAR for n in layers)


def test_onnx_bert_reaches_the_same_fused_ops():
    onnx = pytest.importorskip("onnx")
    import io

    model, inputs = models.bert(layers=2, seq=16)
    f = io.BytesIO()
    torch.onnx.export(model, inputs, f, opset_version=14, dynamo=False)  # opset 14: layer norm decomposed
    fast = kiln.compile(onnx.load_from_string(f.getvalue()), inputs)
    g = fast.compiled[0].graph
    assert g.count(OpKind.ATTENTION) == 2 and g.count(OpKind.LAYER_NORM) == 5 and g.count(OpKind.GELU) == 0
    with torch.no_grad():
        ok, err, tol = max_err_ok(fast(*inputs), model(*inputs))
    assert ok, err


# ----------------------------------------------------------------------------- fuzzing
class RandomNet(nn.Module):
    """A seeded random mix of conv, linear, elementwise, reductions, reshapes and attention."""

    def __init__(self, seed: int):
        super().__init__()
        self.rng = random.Random(seed)
        r = self.rng
        self.c = r.choice([4, 8])
        self.conv = nn.Conv2d(3, self.c, 3, padding=1)
        self.bn = nn.BatchNorm2d(self.c)
        self.fc = nn.Linear(self.c * 16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.ops = [r.choice(["relu", "gelu", "tanh", "sigmoid", "add_res", "scale", "softmax", "ln", "attn",
                              "mean_sub"]) for _ in range(r.randint(2, 6))]
        # what the caller reads: everything, one batch row, one or a few features (the
        # demanded-rows pass moves such slices up the chain where it can)
        self.read = r.choice(["all", "row0", "row1", "feature", "features"])
        self.ln = nn.LayerNorm(32)
        with torch.no_grad():
            self.bn.running_mean.normal_(0, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.rng is not None:
            pass
        y = torch.relu(y).flatten(1)
        h = self.fc(y)
        for op in self.ops:
            if op == "relu":
                h = torch.relu(h)
            elif op == "gelu":
                h = nn.functional.gelu(h)
            elif op == "tanh":
                h = torch.tanh(h)
            elif op == "sigmoid":
                h = torch.sigmoid(h)
            elif op == "add_res":
                h = self.fc2(h) + h
            elif op == "scale":
                h = h * 1.0 + 0.0 - h.mean(-1, keepdim=True)
            elif op == "softmax":
                h = torch.softmax(h, -1) * 32
            elif op == "ln":
                h = self.ln(h)
            elif op == "attn":
                q = h.view(h.shape[0], 1, 4, 8)
                s = torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, -1)
                h = (s @ q).reshape(h.shape[0], 32)
            elif op == "mean_sub":
                h = h - h.amax(-1, keepdim=True)
        return {"all": lambda: h, "row0": lambda: h[:1], "row1": lambda: h[1:], "feature": lambda: h[:, 5],
                "features": lambda: h[:, 3:9]}[self.read]()


@pytest.mark.parametrize("seed", range(16))
def test_pipeline_on_seeded_random_graphs(seed):
    torch.manual_seed(seed)
    model = RandomNet(seed).eval()
    x = torch.randn(2, 3, 4, 4)
    g = _import(model, (x,))
    res = run_pipeline(g, verify_each=True)
    verify_partition(res.partition)
    assert_same_outputs(g, res.graph, [x])


def test_passes_option_selects_and_skips_phases():
    model, inputs = models.resnet18(image=32)
    full = kiln.compile(model, inputs).compiled[0]
    assert full.graph.count(OpKind.BATCH_NORM) == 0
    no_fold = kiln.compile(model, inputs, passes=["-fold"]).compiled[0]
    assert no_fold.graph.count(OpKind.BATCH_NORM) == 20
    none = kiln.compile(model, inputs, passes="none").compiled[0]
    assert none.graph.count(OpKind.BATCH_NORM) == 20 and none.report.passes == []  # no partition either
    only = kiln.compile(model, inputs, passes=["canonicalize", "fold"]).compiled[0]
    assert only.graph.count(OpKind.TO_LAYOUT) == 0 and only.graph.count(OpKind.BATCH_NORM) == 0
    names = [r.phase for r in full.report.passes]
    assert [p for p in PHASE_NAMES if p in names] == [p for p in PHASE_NAMES
                                                      if p not in ("precision", "quantize", "precision_rest")]  # fp32
    with pytest.raises(KilnError, match="unknown pass or phase"):
        kiln.compile(model, inputs, passes=["vectorize"])
    with torch.no_grad():
        for c in (full, no_fold, none, only):
            ok, err, tol = max_err_ok(c.plan.run(list(inputs))[0], model(*inputs))
            assert ok, err

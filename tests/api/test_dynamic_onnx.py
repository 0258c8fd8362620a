"""ONNX models with dim_param dims: one plan serves every size (the shape arithmetic an
exporter writes stays symbolic), outputs match ONNX Runtime at odd batch sizes and lengths,
sizes outside the range are KilnErrors naming the input, the dim and the range, and a model
whose shape arithmetic cannot stay symbolic compiles per shape with a KilnWarning (or, with
dynamic= asked explicitly, fails naming the op)."""
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from kiln import KilnError, KilnWarning, models
from kiln.ir.types import Sym

from conftest import max_err_ok

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _export(model, inputs, names, axes, dynamo: bool) -> onnx.ModelProto:
    with torch.no_grad():
        if dynamo:
            from torch.export import Dim

            dims = {}
            shapes = tuple({a: dims.setdefault(n, Dim(n, min=2, max=4096)) for a, n in axes[name].items()}
                           for name in names)
            prog = torch.onnx.export(model, inputs, dynamo=True, opset_version=18, input_names=names,
                                     dynamic_shapes=shapes, verbose=False)
            return prog.model_proto
        f = io.BytesIO()
        torch.onnx.export(model, inputs, f, input_names=names, dynamic_axes=axes, opset_version=17, dynamo=False)
        return onnx.load_from_string(f.getvalue())


def _check(fast, proto, args):
    sess = ort.InferenceSession(proto.SerializeToString())
    ref = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]
    out = fast(*args)
    out = out[0] if isinstance(out, tuple) else out
    ok, err, tol = max_err_ok(out, torch.from_numpy(ref))
    assert ok, f"{[tuple(a.shape) for a in args]}: {err} > {tol}"


def _tokens(batch, seq):
    return torch.randint(0, 100, (batch, seq)), torch.ones(batch, seq, dtype=torch.int64)


@pytest.mark.parametrize("name,dynamo", [("bert", False), ("hf_bert", False), ("hf_bert", True)])
def test_exported_bert_serves_every_batch_and_length_with_one_plan(name, dynamo):
    model, _ = getattr(models, name)(layers=1, hidden=32, heads=2, ffn=64, vocab=100)
    names = ["input_ids", "attention_mask"]
    proto = _export(model.eval(), _tokens(2, 8), names, {n: {0: "batch", 1: "seq"} for n in names}, dynamo)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KilnWarning)  # no fallback to per-shape plans
        fast = kiln.compile(proto, _tokens(2, 8))
    assert fast.compiled[0].graph.inputs[0].type.shape == (Sym("batch"), Sym("seq"))
    for batch, seq in [(1, 1), (1, 7), (3, 129)]:
        _check(fast, proto, _tokens(batch, seq))
    assert len(fast.compiled) == 1
    if name == "hf_bert":  # the position table has 512 rows: the model bounds seq
        _check(fast, proto, _tokens(1, 512))
        with pytest.raises(KilnError, match=r"input 'input_ids' dim 1 \(seq\) is 513, outside the compiled "
                                            r"range \[1, 512\]"):
            fast(*_tokens(1, 513))


class _Cnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.reshape(y.shape[0], -1))  # Shape -> Gather -> Concat -> Reshape


def test_cnn_dynamic_batch_and_the_out_of_range_error():
    torch.manual_seed(0)
    proto = _export(_Cnn().eval(), (torch.randn(2, 3, 8, 8),), ["x"], {"x": {0: "batch"}}, dynamo=False)
    fast = kiln.compile(proto, (torch.randn(2, 3, 8, 8),))
    for batch in (1, 7, 129):
        _check(fast, proto, (torch.randn(batch, 3, 8, 8),))
    assert len(fast.compiled) == 1

    ranged = kiln.compile(proto, (torch.randn(2, 3, 8, 8),), dynamic={"x": {0: ("batch", 1, 8)}})
    _check(ranged, proto, (torch.randn(8, 3, 8, 8),))
    with pytest.raises(KilnError, match=r"input 'x' dim 0 \(batch\) is 9, outside the compiled range \[1, 8\]"):
        ranged(torch.randn(9, 3, 8, 8))

    static = kiln.compile(proto, (torch.randn(2, 3, 8, 8),), dynamic=False)
    assert static.compiled[0].graph.inputs[0].type.shape == (2, 3, 8, 8)


def _mlp(dims=("batch", 4)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.random.RandomState(0).randn(12).tolist())
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "mlp", [x], [y], [w]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_explicit_dynamic_for_onnx_by_name_and_position():
    proto = _mlp()
    by_position = kiln.compile(proto, (torch.randn(2, 4),), dynamic={0: {0: ("n", 1, 64)}})
    assert by_position.compiled[0].graph.inputs[0].type.shape == (Sym("n"), 4)
    for batch in (1, 7, 64):
        _check(by_position, proto, (torch.randn(batch, 4),))
    with pytest.raises(KilnError, match="no input named 'z'; the inputs are x"):
        kiln.compile(proto, (torch.randn(2, 4),), dynamic={"z": {0: "batch"}})
    with pytest.raises(KilnError, match=r"input 'x' dim 1 \(k\) cannot vary: the model fixes it to 4"):
        kiln.compile(proto, (torch.randn(2, 4),), dynamic={"x": {1: "k"}})
    with pytest.raises(KilnError, match="no dim_param"):
        kiln.compile(_mlp((2, 4)), (torch.randn(2, 4),), dynamic=True)


def _branchy():
    """y = x if the batch is 3 else -x: a shape test whose answer depends on the call."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    three = helper.make_tensor("three", TensorProto.INT64, [], [3])
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["b"]),
             helper.make_node("Equal", ["b", "three"], ["is3"], name="is_three"), helper.make_node("Neg", ["x"], ["nx"]),
             helper.make_node("Where", ["is3", "x", "nx"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "branchy", [x], [y], [three, zero]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_shape_arithmetic_that_cannot_stay_symbolic():
    proto = _branchy()
    with pytest.warns(KilnWarning, match=r"is_three \(Equal\).*compiling a plan per input shape"):
        fast = kiln.compile(proto, (torch.randn(2, 4),))
    for batch in (3, 5):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(fast(x), x if batch == 3 else -x)
    assert fast.compiled[0].graph.inputs[0].type.is_static
    with pytest.raises(KilnError, match=r"is_three \(Equal\): whether batch equals 3 depends on the call's sizes"):
        kiln.compile(proto, (torch.randn(2, 4),), dynamic=True)


def test_squeeze_without_axes_on_a_dynamic_dim_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    proto = helper.make_model(helper.make_graph([helper.make_node("Squeeze", ["x"], ["y"], name="sq")], "sq", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(KilnError, match="Squeeze without axes on a tensor of symbolic shape"):
        kiln.compile(proto, (torch.randn(1, 4),), dynamic=True)
    with pytest.warns(KilnWarning, match="Squeeze without axes"):
        fast = kiln.compile(proto, (torch.randn(1, 4),))
    x1 = torch.randn(1, 4)
    torch.testing.assert_close(fast(x1), x1[0])


def test_a_dynamic_onnx_model_saves_and_loads(tmp_path):
    model, _ = models.bert(layers=1, hidden=32, heads=2, ffn=64, vocab=100)
    names = ["input_ids", "attention_mask"]
    proto = _export(model.eval(), _tokens(2, 8), names, {n: {0: "batch", 1: "seq"} for n in names}, False)
    fast = kiln.compile(proto, _tokens(2, 8))
    kiln.save(fast, tmp_path / "m.kiln")
    loaded = kiln.load(tmp_path / "m.kiln")
    for batch, seq in [(1, 1), (3, 129)]:
        args = _tokens(batch, seq)
        a, b = fast(*args), loaded(*args)
        assert torch.equal(a[0] if isinstance(a, tuple) else a, b[0] if isinstance(b, tuple) else b)
        _check(loaded, proto, args)
    assert len(loaded.compiled) == 1

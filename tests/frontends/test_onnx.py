"""ONNX import: the example models exported by torch.onnx.export match ONNX Runtime."""
import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from kiln import KilnError, models
from kiln.frontends.onnx_import import from_onnx, load_onnx
from kiln.ir import OpKind

ort = pytest.importorskip("onnxruntime")


def _export(model, inputs, dynamo: bool, opset: int) -> bytes:
    """torch.onnx.export into memory: the dynamo exporter (onnxscript) or the TorchScript one."""
    with torch.no_grad():
        if dynamo:
            prog = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset, verbose=False)
            return prog.model_proto.SerializeToString()
        f = io.BytesIO()
        torch.onnx.export(model, inputs, f, opset_version=opset, dynamo=False)
        return f.getvalue()


CASES = [  # (model, exporter, opset)
    ("resnet18", False, 13), ("resnet18", True, 18), ("bert", False, 17), ("bert", True, 18),
    ("hf_bert", False, 17), ("hf_bert", True, 18), ("lstm", False, 14), ("lstm", True, 18),
    ("gru", False, 14), ("gru", True, 18), ("resnet50", True, 18),
]


def _small(name):
    kw = {"layers": 2} if "bert" in name else {}
    return models.get(name, **kw)


@pytest.mark.parametrize("name,dynamo,opset", CASES, ids=[f"{n}-{'dynamo' if d else 'ts'}-{o}" for n, d, o in CASES])
def test_onnx_model_matches_onnxruntime(name, dynamo, opset):
    model, inputs = _small(name)
    data = _export(model, inputs, dynamo, opset)
    proto = onnx.load_from_string(data)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    want = sess.run(None, feeds)
    fast = kiln.compile(proto, inputs)
    got = fast(*inputs)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        err = np.abs(g.numpy() - w).max()
        assert err <= 1e-4 * max(1.0, np.abs(w).max()), f"max abs error {err}"
    c = fast.compiled[0]
    if name in ("lstm", "gru"):
        assert c.graph.count(OpKind.LSTM if name == "lstm" else OpKind.GRU) == 2  # one per ONNX layer


def test_onnx_and_torch_frontends_agree_on_resnet():
    model, inputs = models.resnet18(image=64)
    proto = onnx.load_from_string(_export(model, inputs, False, 17))
    g = from_onnx(proto, list(inputs))
    counts = g.op_counts()
    assert counts["conv2d"] == 20 and counts["relu"] == 17 and counts["add"] == 8


def test_onnx_without_example_inputs_uses_model_shapes():
    model, inputs = _small("lstm")
    proto = onnx.load_from_string(_export(model, inputs, False, 14))
    fast = kiln.compile(proto)  # shapes come from the model; compiled on first call
    got = fast(*inputs)
    with torch.no_grad():
        torch.testing.assert_close(got, model(*inputs), atol=1e-5, rtol=1e-5)


def _tiny(op="Relu", opset=17, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], "tiny", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_bad_onnx_inputs_are_clear_errors(tmp_path):
    with pytest.raises(KilnError, match="does not exist"):
        kiln.compile(str(tmp_path / "missing.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(KilnError, match="(not a readable ONNX model|malformed ONNX)"):
        kiln.compile(str(junk))
    good = _tiny().SerializeToString()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(KilnError, match="(not a readable ONNX model|malformed ONNX)"):
        kiln.compile(str(trunc))
    with pytest.raises(KilnError, match="unsupported ONNX opset 11"):
        load_onnx(_tiny(opset=11))
    with pytest.raises(KilnError, match="unsupported ONNX operator.*Hardmax"):
        load_onnx(_tiny("Hardmax"))
    bad = _tiny()
    bad.graph.node[0].input[0] = "nope"
    with pytest.raises(KilnError, match="malformed ONNX"):
        load_onnx(bad)


def test_onnx_input_guards():
    fast = kiln.compile(_tiny())
    x = torch.randn(2, 3)
    torch.testing.assert_close(fast(x), x.relu())
    with pytest.raises(KilnError, match="expected dtype torch.float32"):
        fast(x.double())
    with pytest.raises(KilnError, match="expected rank 2"):
        fast(x[None])
    with pytest.raises(KilnError, match=r"compiled for 1 input\(s\)"):
        fast(x, x)
    with pytest.raises(KilnError, match=r"expected shape \[2, 3\]"):
        fast(torch.randn(4, 3))  # the model's dims are fixed at 2x3

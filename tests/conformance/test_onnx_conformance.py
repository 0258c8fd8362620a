"""ONNX's backend node tests for every op Kiln claims: zero wrong answers allowed."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import onnx_node_tests as T  # noqa: E402


@pytest.mark.slow  # the whole ONNX node suite: `make test-slow` (CI runs it), `make onnx-conformance`
def test_onnx_backend_node_tests_have_no_failures(capsys):
    res = T.run()
    with capsys.disabled():
        print("\n" + T.summary(res))
    fails = {name: why for name, (status, why, _) in res.items() if status == "fail"}
    assert not fails, f"{len(fails)} wrong answers: {fails}"
    passed = sum(1 for s, _, _ in res.values() if s == "pass")
    assert passed >= 500  # the node tests Kiln passes today; fewer means a regression


def test_kiln_backend_interface():
    import numpy as np
    from onnx import TensorProto, helper

    import kiln.onnx_backend as backend

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    m = helper.make_model(helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    assert backend.supports_device("CPU") and backend.is_compatible(m)
    a = np.random.randn(2, 3).astype(np.float32)
    (out,) = backend.prepare(m).run([a])
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-a)), rtol=1e-6)
    (out,) = backend.run_model(m, [a])
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-a)), rtol=1e-6)

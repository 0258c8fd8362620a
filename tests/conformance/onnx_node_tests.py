"""Run ONNX's own backend node tests (they ship inside the onnx package) against Kiln.

Only tests whose every op Kiln claims to support are attempted. Each ends as
pass (outputs match within the test's tolerance), not-supported (Kiln raised a KilnError
saying so: an attribute, dtype or opset it does not take), or fail (a wrong answer or an
unexpected exception — a bug).

    python tests/conformance/onnx_node_tests.py [-v] [substring ...]
"""
from __future__ import annotations

import glob
import os
import sys
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

warnings.filterwarnings("ignore")


def supported_ops() -> set[str]:
    from kiln.frontends.onnx_import import _LITERAL_ONLY, CONVERTERS

    return set(CONVERTERS) | _LITERAL_ONLY


def node_tests():
    from onnx.backend.test.loader import load_model_tests

    return load_model_tests(kind="node")


def _cases(t):
    """(model, [(inputs, outputs), ...]) from the test's data directory or its in-memory data."""
    if t.model is not None and t.data_sets is not None:
        return t.model, [(list(i), list(o)) for i, o in t.data_sets]
    model = onnx.load(os.path.join(t.model_dir, "model.onnx"))
    cases = []
    for case in sorted(glob.glob(os.path.join(t.model_dir, "test_data_set_*"))):
        ins = [numpy_helper.to_array(onnx.load_tensor(f)) for f in sorted(glob.glob(os.path.join(case, "input_*.pb")))]
        outs = [numpy_helper.to_array(onnx.load_tensor(f)) for f in sorted(glob.glob(os.path.join(case, "output_*.pb")))]
        cases.append((ins, outs))
    return model, cases


def run_one(model, cases, rtol, atol) -> tuple[str, str]:
    import torch  # noqa: F401

    from kiln.api import CompiledModel
    from kiln.errors import KilnError
    from kiln.frontends.onnx_import import numpy_to_torch

    def torch_to_numpy(t):
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    try:
        for ins, want in cases:
            ins = [np.asarray(a) if isinstance(a, np.generic) else a for a in ins]
            if any(not isinstance(a, np.ndarray) or a.dtype == object for a in ins):
                return "not-supported", "string/sequence/optional inputs"
            tensors = [numpy_to_torch(a) for a in ins]
            fast = CompiledModel(model, tensors)
            out = fast(*tensors)
            got = [torch_to_numpy(o) for o in (out if isinstance(out, tuple) else (out,))]
            if len(got) < len(want):
                return "fail", f"{len(got)} outputs, expected {len(want)}"
            for g, w in zip(got, want):
                w = np.asarray(w)
                if g.shape != w.shape:
                    return "fail", f"shape {g.shape} != {w.shape}"
                if g.dtype != w.dtype:
                    return "fail", f"dtype {g.dtype} != {w.dtype}"
                if w.dtype.kind in "fc":
                    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
                elif not np.array_equal(g, w):
                    return "fail", "values differ"
        return "pass", ""
    except KilnError as e:
        return "not-supported", str(e).splitlines()[0][:160]
    except AssertionError as e:
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        return "fail", (lines[2] if len(lines) > 2 else "mismatch")[:160]
    except Exception as e:
        return "fail", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"


def run(filters=(), verbose=False):
    ops = supported_ops()
    results = {}
    for t in node_tests():
        if filters and not any(f in t.name for f in filters):
            continue
        if t.model is None and not (t.model_dir and os.path.exists(os.path.join(t.model_dir, "model.onnx"))):
            continue  # tests defined by URL (real models) need downloads
        model, cases = _cases(t)
        used = {n.op_type for n in model.graph.node}
        if not used or not used <= ops or any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
            continue
        status, why = run_one(model, cases, t.rtol, t.atol)
        results[t.name] = (status, why, sorted(used))
        if verbose and status != "pass":
            print(f"{status:>13}  {t.name}: {why}")
    return results


def summary(results) -> str:
    counts = {"pass": 0, "fail": 0, "not-supported": 0}
    for status, _, _ in results.values():
        counts[status] += 1
    attempted = counts["pass"] + counts["fail"]
    return (f"ONNX node tests on Kiln's supported ops: {len(results)} selected; passed {counts['pass']} / "
            f"attempted {attempted}; failed {counts['fail']}; not supported {counts['not-supported']}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "-v"]
    res = run(args, verbose="-v" in sys.argv)
    print(summary(res))
    sys.exit(1 if any(s == "fail" for s, _, _ in res.values()) else 0)

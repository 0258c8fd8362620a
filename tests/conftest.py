import os
import warnings

import pytest
import torch

os.environ.setdefault("KILN_VERIFY", "1")  # ir.verify after every stage, in all tests
if "KILN_CACHE_DIR" not in os.environ:  # tests never read or write the user's cache
    import tempfile

    os.environ["KILN_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-test-cache-")
warnings.filterwarnings("ignore", category=FutureWarning)
# eager references computed before any plan exists must be as accurate as later ones
from kiln.kernels.vml_dispatch import resolve_vml_dispatch  # noqa: E402

resolve_vml_dispatch()
warnings.filterwarnings("ignore", category=UserWarning, module="contextlib")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def max_err_ok(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> tuple[bool, float, float]:
    """The foundation's tolerance: max abs error <= rel * max(1, |ref|max)."""
    err = (out.double() - ref.double()).abs().max().item()
    tol = rel * max(1.0, ref.abs().max().item())
    return err <= tol, err, tol


def random_inputs(graph, seed: int = 0):
    """Random tensors for a graph's inputs (ints in [0, 4), bools, normal floats)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in graph.inputs:
        dt = v.type.dtype.to_torch()
        shape = tuple(v.type.shape)
        if dt == torch.bool:
            out.append(torch.rand(shape, generator=g) > 0.5)
        elif dt.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dt))
        else:
            out.append(torch.randint(0, 4, shape, generator=g, dtype=dt))
    return out


def run_graph(graph, inputs, target="reference"):
    from kiln.runtime.plan import build_plan

    with torch.no_grad():
        return build_plan(graph, target).run(list(inputs))


def assert_same_outputs(before, after, inputs=None, rel=1e-4):
    """The rewritten graph computes what the original computed (foundation tolerance)."""
    from kiln.ir import verify

    verify(after)
    inputs = inputs if inputs is not None else random_inputs(before)
    a, b = run_graph(before, inputs), run_graph(after, inputs)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        if x.dtype.is_floating_point:
            ok, err, tol = max_err_ok(y, x, rel)
            assert ok, f"max abs error {err:.3g} > {tol:.3g}"
        else:
            assert torch.equal(x, y)


def assert_structural_equal(a, b):
    """Same ops, attributes, types and wiring (names and constant values ignored)."""
    from kiln.ir import format_graph, structural_hash

    ha, hb = structural_hash(a, include_constants=False), structural_hash(b, include_constants=False)
    assert ha == hb, f"graphs differ:\n--- got\n{format_graph(a, False)}\n--- expected\n{format_graph(b, False)}"

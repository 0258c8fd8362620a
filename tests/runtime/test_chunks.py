"""A separable batch run in chunks (runtime/chunks.py): balanced chunks, shared inputs, the
decision from a plan's bytes per sample, and a dynamic CNN compiled, saved and loaded with
outputs equal to eager and to the unchunked plan's."""
import pytest
import torch

import kiln
from kiln import KilnError, models
from kiln.ir import GraphBuilder, OpKind, Sym
from kiln.ir import attrs as A
from kiln.runtime.chunks import MIN_ROWS, BatchChunks, plan_chunks
from kiln.runtime.plan import build_plan

from conftest import max_err_ok


def test_a_call_runs_as_balanced_chunks_and_shared_inputs_stay_whole():
    seen = []

    def forward(inputs, consts):
        seen.append((inputs[0].shape[0], inputs[1].shape[0]))
        return [inputs[0] * 2 + inputs[1].sum(), inputs[0][:, :1]]

    chunks = BatchChunks("batch", 16, (True, False))
    x, w = torch.randn(33, 4), torch.randn(5)
    out = chunks.run(forward, [x, w], {})
    assert seen == [(11, 5)] * 3  # 33 as 11 + 11 + 11, not 16 + 16 + 1
    torch.testing.assert_close(out[0], x * 2 + w.sum(), rtol=0, atol=0)
    torch.testing.assert_close(out[1], x[:, :1], rtol=0, atol=0)
    seen.clear()
    chunks.run(forward, [x[:16], w], {})
    assert seen == [(16, 5)]  # at most ``rows``: one call


def build(fn, shape):
    b = GraphBuilder("g")
    return b.build((fn(b, b.input("x", shape)),))


def _mlp_and_cnn():
    def mlp(b, x):
        return b.add(OpKind.LINEAR, x, b.const(torch.randn(8, 4)))

    def cnn(b, x):
        return b.add(OpKind.CONV2D, x, b.const(torch.randn(16, 3, 3, 3)), attrs=A.Conv2dAttrs(padding=(1, 1)))

    return build(mlp, (Sym("batch"), 4)), build(cnn, (Sym("batch"), 3, 256, 256))


def _static_cnn():
    return build(lambda b, x: b.add(OpKind.CONV2D, x, b.const(torch.randn(4, 3, 3, 3)), attrs=A.Conv2dAttrs()),
                 (2, 3, 8, 8))


def test_rows_follow_the_bytes_a_sample_holds():
    mlp, cnn = (build_plan(g, "cpu", sizes={"batch": 2}, batch_chunk=None) for g in _mlp_and_cnn())
    for plan in (mlp, cnn):
        assert plan.chunks is not None and plan.chunks.size == "batch"
        assert "in chunks of at most" in plan.chunking
    # an MLP's sample is 32 output bytes: chunks far larger than any batch it serves
    assert mlp.chunks.rows > 10 ** 5
    # a 256x256 image with 16 channels is 4 MiB: the minimum rows
    assert cnn.chunks.rows == MIN_ROWS
    assert build_plan(cnn.graph, "cpu", sizes={"batch": 2}, batch_chunk=3).chunks.rows == 3
    off = build_plan(cnn.graph, "cpu", sizes={"batch": 2}, batch_chunk=0)
    assert off.chunks is None and "batch_chunk=0" in off.chunking
    assert plan_chunks(_static_cnn(), [], [], None) == (None, "")  # static shapes: nothing to decide


def test_a_dynamic_cnn_in_chunks_matches_eager_and_its_unchunked_plan(tmp_path):
    model, inputs = models.resnet18(batch=2, image=32, num_classes=10)
    fast = kiln.compile(model, inputs, dynamic=True, batch_chunk=4)
    c = fast.compiled[0]
    assert c.plan.chunks is not None and c.plan.chunks.rows == 4
    assert "chunks of at most 4" in c.report.batch_chunks and "batch: " in str(c.report)
    x = torch.randn(11, 3, 32, 32)
    with torch.no_grad():
        got = fast(x)
        ok, err, tol = max_err_ok(got, model(x))
        assert ok, f"{err} > {tol}"
        chunks, c.plan.chunks = c.plan.chunks, None
        whole = fast(x)
        c.plan.chunks = chunks
    torch.testing.assert_close(got, whole)
    fast.save(tmp_path / "r.kiln")
    back = kiln.load(tmp_path / "r.kiln")
    assert back.compiled[0].plan.chunks.rows == 4 and back.options.batch_chunk == 4
    with torch.no_grad():
        torch.testing.assert_close(back(x), got, rtol=0, atol=0)


def test_batch_chunk_is_checked():
    model, inputs = models.resnet18(batch=2, image=32, num_classes=10)
    with pytest.raises(KilnError, match="batch_chunk must be"):
        kiln.compile(model, inputs, batch_chunk=-1)
    with pytest.raises(KilnError, match="batch_chunk must be"):
        kiln.compile(model, inputs, batch_chunk=2.5)

"""kiln.batching (what each replica and Ray Data actor runs), without Ray: requests cut and
padded to the artifact's saved batch sizes, answered per request, checked against eager."""
import io
import json

import numpy as np
import pytest
import torch

from serving_fixtures import BATCH_SIZES, artifact, small_model  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def batcher(artifact):
    import kiln
    from kiln.batching import Batcher

    return Batcher(kiln.load(artifact))


def _eager(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_signatures_are_the_saved_plans(batcher):
    assert batcher.by_rest == {(((3, 8, 8), "float32"),): sorted(BATCH_SIZES)}
    assert batcher.describe() == "(float32[B, 3, 8, 8]) with B in [1, 4]"


@pytest.mark.parametrize("rows", [[1], [3], [4], [2, 3], [1, 1, 1, 1, 1, 1], [5, 2, 4]])
def test_requests_cut_padded_and_answered_per_request(batcher, small_model, rows):
    """Every request gets exactly its rows, equal to eager on that request alone, whatever
    chunking (4s, 1s) and padding (a chunk of 3 padded to 4) the batch took."""
    rng = np.random.default_rng(sum(rows))
    reqs = [batcher.check([rng.standard_normal((n, 3, 8, 8), dtype=np.float32)]) for n in rows]
    outs = batcher.run(reqs)
    assert len(outs) == len(reqs)
    for req, out in zip(reqs, outs):
        assert not isinstance(out, Exception), out
        (y,) = out
        ref = _eager(small_model, req[0])
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_lossless_dtypes_are_cast_others_refused(batcher):
    from kiln.batching import BadRequest

    (x,) = batcher.check([np.ones((2, 3, 8, 8), dtype=np.int32)])
    assert x.dtype == np.float32
    with pytest.raises(BadRequest, match="match no saved plan.*float32\\[B, 3, 8, 8\\]"):
        batcher.check([np.ones((2, 3, 9, 8), np.float32)])
    with pytest.raises(BadRequest, match="match no saved plan"):
        batcher.check([np.ones((3, 8, 8), np.float32)])  # no batch dim
    with pytest.raises(BadRequest, match="takes 1 input"):
        batcher.check([np.ones((1, 3, 8, 8), np.float32)] * 2)
    with pytest.raises(BadRequest, match="numeric"):
        batcher.check([np.array([["a"]])])
    with pytest.raises(BadRequest, match="rows"):
        batcher.check([np.ones((0, 3, 8, 8), np.float32)])


def test_float_for_an_integer_input_is_refused():
    from kiln.batching import BadRequest, Batcher, Signature

    b = Batcher(lambda ids: ids * 2, [Signature(2, (((3,), "int64"),))])
    (x,) = b.check([np.ones((2, 3), np.int32)])
    assert x.dtype == np.int64
    with pytest.raises(BadRequest, match="expected dtype int64, got float32"):
        b.check([np.ones((2, 3), np.float32)])
    (out,) = b.run([b.check([np.arange(3).reshape(1, 3)])])  # one row, padded to the plan's 2
    assert np.array_equal(out[0], [[0, 2, 4]])


def test_named_dims_take_any_size_and_an_any_batch_plan_runs_in_one_call():
    """The signatures of a dynamic= artifact (its plans' keys hold dim names): a symbolic
    batch dim runs the whole group in one call, unpadded; a named sequence dim takes any
    length, the same on every input that names it."""
    import types

    import kiln.batching as kb

    key = (("threads", 1), (("batch", "seq"), torch.int64), (("batch", "seq"), torch.int64))
    fake = types.SimpleNamespace(state=lambda: types.SimpleNamespace(name="m", plans=[(key, None)], tensor_args=2))
    sigs = kb.signatures(fake)
    assert sigs == [kb.Signature(None, ((("seq",), "int64"), (("seq",), "int64")))]
    calls = []

    def model(ids, mask):
        calls.append(tuple(ids.shape))
        return ids * mask

    b = kb.Batcher(model, sigs)
    assert b.describe() == "(int64[B, seq], int64[B, seq]) with any B"
    reqs = [b.check([np.full((n, length), n), np.ones((n, length), np.int64)]) for n, length in [(1, 5), (3, 5), (2, 7)]]
    outs = b.run(reqs)
    assert sorted(calls) == [(2, 7), (4, 5)]  # one call per length, rows never padded
    for (ids, _), (y,) in zip(reqs, outs):
        assert np.array_equal(y, ids)
    with pytest.raises(kb.BadRequest, match="match no saved plan"):
        b.check([np.ones((1, 5), np.int64), np.ones((1, 6), np.int64)])  # "seq" disagrees


def test_bodies_parse_or_raise_bad_request():
    from kiln.batching import BadRequest, array_response, json_response, parse_body

    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    buf = io.BytesIO()
    np.save(buf, x)
    (a,), fmt = parse_body(buf.getvalue(), 1)
    assert fmt == "npy" and np.array_equal(a, x)
    (a,), fmt = parse_body(json.dumps({"inputs": x.tolist()}).encode(), 1)
    assert fmt == "json" and a.dtype == np.float32 and np.array_equal(a, x)
    (a,), _ = parse_body(json.dumps(x.tolist()).encode(), 1)
    assert np.array_equal(a, x)
    buf = io.BytesIO()
    np.savez(buf, x, x + 1)
    (a, b), fmt = parse_body(buf.getvalue(), 2)
    assert fmt == "npz" and np.array_equal(b, x + 1)
    for body, n, msg in [(b"{not json", 1, "neither JSON"), (b'{"x": 1}', 1, '"inputs"'),
                         (json.dumps({"inputs": [[1, 2], [3]]}).encode(), 1, "rectangular"),
                         (json.dumps({"inputs": [[1]]}).encode(), 2, "takes 2 inputs"),
                         (b"\x93NUMPY garbage", 1, "cannot be read")]:
        with pytest.raises(BadRequest, match=msg):
            parse_body(body, n)
    assert json_response([x]) == {"output": x.tolist()}
    assert np.array_equal(np.load(io.BytesIO(array_response([x], "npy"))), x)


def test_a_dynamic_artifact_runs_a_group_in_one_unpadded_call(small_model, tmp_path):
    """A dynamic= artifact's batch dim is symbolic: requests of 1, 3 and 5 rows run as one
    9-row call (no cutting to saved sizes, no padding), each answered with its own rows."""
    import kiln
    from kiln.batching import Batcher

    fast = kiln.compile(small_model, (torch.randn(2, 3, 8, 8),), dynamic=True)
    kiln.save(fast, tmp_path / "dyn.kiln")
    loaded = kiln.load(tmp_path / "dyn.kiln")
    calls = []
    run = loaded.__call__

    class Counting:
        def __getattr__(self, name):
            return getattr(loaded, name)

        def __call__(self, *xs):
            calls.append(tuple(x.shape[0] for x in xs))
            return run(*xs)

    batcher = Batcher(Counting())
    rng = np.random.default_rng(0)
    reqs = [batcher.check([rng.standard_normal((n, 3, 8, 8), dtype=np.float32)]) for n in (1, 3, 5)]
    outs = batcher.run(reqs)
    assert calls == [(9,)]
    for req, out in zip(reqs, outs):
        assert not isinstance(out, Exception), out
        np.testing.assert_allclose(out[0], _eager(small_model, req[0]), rtol=1e-4, atol=1e-4)

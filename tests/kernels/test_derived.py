"""kernels.derived: a kernel's tensor derived from a constant, shared, shipped and seeded."""
import gc

import torch

from kiln.kernels.derived import derive, made, seeded


def _fits(t):
    return t.shape == (4,) and t.dtype == torch.float32


def test_made_once_per_constant_and_kernel_while_alive():
    w = torch.randn(4)
    calls = []

    def make():
        calls.append(1)
        return w * 2

    a = derive("k", 1, w, make, _fits)
    assert derive("k", 1, w, make, _fits) is a and len(calls) == 1  # a second size bucket shares it
    assert made("k", w) == (1, a)
    assert derive("other", 1, w, make, _fits) is not a and len(calls) == 2  # per kernel
    assert derive("k", 2, w, make, _fits) is not a and len(calls) == 3  # per version
    assert made("k", torch.randn(4)) is None


def test_a_dropped_derivation_is_freed_not_kept_for_saving():
    w = torch.randn(4)
    a = derive("k", 1, w, lambda: w + 1, _fits)
    del a
    gc.collect()
    assert made("k", w) is None


def test_seeded_tensors_are_taken_only_at_their_version_and_shape():
    w = torch.randn(4)
    shipped = torch.full((4,), 7.0)

    def twice(c):
        return lambda: c * 2

    with seeded([("k", 1, w, shipped)]):
        assert derive("k", 1, w, twice(w), _fits) is shipped
        assert made("k", w) == (1, shipped)  # a model loaded and saved again ships it again
    v = torch.randn(4)
    with seeded([("k", 1, v, shipped)]):
        assert torch.equal(derive("k", 2, v, twice(v), _fits), v * 2)  # another version: made again
    u = torch.randn(4)
    with seeded([("k", 1, u, torch.zeros(5))]):
        assert torch.equal(derive("k", 1, u, twice(u), _fits), u * 2)  # does not fit: made again
    x = torch.randn(4)
    with seeded([("k", 1, x, shipped)]):
        pass
    assert torch.equal(derive("k", 1, x, twice(x), _fits), x * 2)  # the seed lasts for its block only

"""Decoders that return a Hugging Face cache compile, and return the cache eager returns."""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import kiln
from kiln.bench import suite_models


@pytest.mark.parametrize("name", ["qwen2", "mistral"])  # plain layers; sliding-window layers
def test_decoder_cache_output_is_rebuilt_like_eagers(name):
    model, inputs = suite_models.build(name, quick=True)
    assert model.config.use_cache  # the config's default: the model returns its cache
    with torch.no_grad():
        want = model(*inputs)
    fast = kiln.compile(model, inputs)
    got = fast(*inputs)
    cache, ref = got.past_key_values, want.past_key_values
    assert type(cache) is type(ref) and [type(x) for x in cache.layers] == [type(x) for x in ref.layers]
    assert cache.get_seq_length() == ref.get_seq_length() == inputs[0].shape[1]
    g, w = pytree.tree_leaves(got), pytree.tree_leaves(want)
    assert len(g) == len(w) > 1 + 2 * model.config.num_hidden_layers - 1
    for a, b in zip(g, w):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert a == b
    # the rebuilt cache serves the next step as eager's does
    nxt = torch.tensor([[5]])
    with torch.no_grad():
        a = model(nxt, past_key_values=cache).logits
        b = model(nxt, past_key_values=ref).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not fast.report.fallbacks

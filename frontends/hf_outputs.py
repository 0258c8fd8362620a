"""Hugging Face cache objects in a model's outputs.

A decoder called with ``use_cache`` (its config's default) returns a ``DynamicCache`` beside
its logits. ``torch.export`` accepts only pytree nodes in outputs, so without help it refuses
the model ("Found DynamicCache in output"). Kiln registers transformers' own cache pytrees
(``transformers.exporters.exporter_dynamo.register_cache_pytrees_for_model``: every ``Cache``
subclass, flattened attribute by attribute into its tensors and a JSON-native context), so
the export succeeds, the cache's tensors become graph outputs, and the compiled model returns
a cache rebuilt with the same class, layer classes and attribute values as eager's — the
outputs stay identical to the model's instead of being changed by exporting with
``use_cache=False``.

Only models whose class comes from ``transformers`` are touched, and only when transformers
is already imported (a model built from it is); registering is idempotent.
"""
from __future__ import annotations

import sys

import torch


def register_output_pytrees(model) -> bool:
    """Register the cache pytrees ``model`` may return; True when transformers' were registered."""
    if "transformers" not in sys.modules or not isinstance(model, torch.nn.Module):
        return False
    if not type(model).__module__.startswith("transformers."):
        return False
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:  # an older transformers: its caches stay unregistered (export refuses them)
        return False
    register_cache_pytrees_for_model(model)
    return True

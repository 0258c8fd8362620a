"""Resolve a model reference given on the command line."""
from __future__ import annotations

import importlib
import os

from .errors import KilnError


def load_model(ref: str):
    """``resnet18`` (built-in), ``model.onnx``, or ``package.module:factory`` -> (model, inputs).

    For an ONNX file the inputs are None (shapes come from the file).
    """
    from . import models

    if ref in models.NAMES:
        return models.get(ref)
    if ref.endswith(".onnx") or os.path.exists(ref):
        return ref, None
    if ":" in ref:
        mod, _, fn = ref.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise KilnError(f"cannot load {ref!r}: {e}") from None
        out = factory()
        if not (isinstance(out, tuple) and len(out) == 2):
            raise KilnError(f"{ref} must return (model, example_inputs)")
        return out
    raise KilnError(f"unknown model {ref!r}: use one of {', '.join(models.NAMES)}, an .onnx file, "
                    f"or package.module:factory")

"""Kiln as an ONNX backend (``onnx.backend.base.Backend``), so ONNX's own backend node
tests run against it:

    import kiln.onnx_backend as backend
    rep = backend.prepare(model_proto)
    outputs = rep.run([input_array, ...])
"""
from __future__ import annotations

import numpy as np
import torch
from onnx.backend.base import Backend, BackendRep

from .errors import KilnError


class KilnRep(BackendRep):
    def __init__(self, compiled, n_outputs: int):
        self.compiled = compiled
        self.n_outputs = n_outputs

    def run(self, inputs, **kwargs):
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        elif isinstance(inputs, dict):
            inputs = list(inputs.values())
        tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
        out = self.compiled(*tensors)
        outs = out if isinstance(out, tuple) else (out,)
        return tuple(o.numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outs)


class KilnBackend(Backend):
    @classmethod
    def is_compatible(cls, model, device: str = "CPU", **kwargs) -> bool:
        from kiln.frontends.onnx_import import load_onnx

        try:
            load_onnx(model)
        except KilnError:
            return False
        return device == "CPU"

    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs):
        from .api import CompiledModel

        if device != "CPU":
            raise KilnError(f"the Kiln ONNX backend runs on CPU, not {device}")
        return KilnRep(CompiledModel(model, name=model.graph.name or "onnx_model"), len(model.graph.output))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


prepare = KilnBackend.prepare
is_compatible = KilnBackend.is_compatible
supports_device = KilnBackend.supports_device
run_model = KilnBackend.run_model
run_node = KilnBackend.run_node

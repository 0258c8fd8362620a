"""``kiln debug accuracy``: load a model reference and run the accuracy debugger on it."""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .errors import KilnError


def _onnx_inputs(proto):
    from kiln.frontends.onnx_import import input_signature

    g = torch.Generator().manual_seed(0)
    out = []
    for _, dt, dims in input_signature(proto):
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims)
        out.append(torch.randn(shape, generator=g).to(dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt))
    return out


def accuracy_report(ref: str, rel: float = 1e-4, passes=None):
    from kiln.runtime.debug import debug_accuracy

    from .modelref import load_model

    model, inputs = load_model(ref)
    if inputs is None:  # ONNX: random inputs; ONNX Runtime's outputs are the reference
        from kiln.frontends.onnx_import import from_onnx, load_onnx

        proto = load_onnx(model)
        xs = _onnx_inputs(proto)
        graph = from_onnx(proto, xs)
        eager = None
        try:
            import onnxruntime as ort

            sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            eager = [torch.from_numpy(o) for o in
                     sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})]
        except ImportError:
            pass
        return debug_accuracy(graph, xs, eager, rel=rel, select=passes)
    from kiln.frontends.torch_export import export_program, from_exported

    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    try:
        ep = export_program(model, inputs)
    except Exception as e:
        raise KilnError(f"torch.export could not trace {ref}: {type(e).__name__}") from e
    imp = from_exported(ep, ref)
    with torch.no_grad():
        eager = [x for x in pytree.tree_leaves(model(*inputs)) if isinstance(x, torch.Tensor)]
    tensors = [x for x in pytree.tree_leaves((inputs, {})) if isinstance(x, torch.Tensor)]
    return debug_accuracy(imp.graph, tensors, eager, rel=rel, select=passes)

"""``torch.compile(model, backend="kiln")``: Kiln as a TorchDynamo backend.

Dynamo hands over each captured FX graph; Kiln compiles it on its first call with the
real inputs (``torch.export`` re-traces the FX module), and recompiles per input shape.

Dynamo lifts a module's parameters and buffers into graph inputs (it marks them: they are
``nn.Parameter`` objects or carry ``_dynamo_static_input_type``). Kiln compiles them as what
they are — weights, folded and prepacked once, as ``kiln.compile`` does — rather than as
activations arriving on every call. Each call checks that the same tensors arrive, unchanged
(same object, same in-place version counter); when one differs (a new state dict, an
in-place update) the graph is compiled again with the new values, never run with stale ones.
"""
from __future__ import annotations

import torch


def _is_weight(x) -> bool:
    return isinstance(x, torch.Tensor) and (isinstance(x, torch.nn.Parameter) or
                                           getattr(x, "_dynamo_static_input_type", None) is not None)


class _Frozen(torch.nn.Module):
    """The FX graph with its lifted weights held as buffers, so the export sees constants."""

    def __init__(self, gm, example_inputs, weights: list[int]):
        super().__init__()
        self.gm = gm
        self.n = len(example_inputs)
        self.slots = weights
        for j, i in enumerate(weights):
            self.register_buffer(f"w{j}", example_inputs[i].detach())

    def forward(self, *live):
        it, args = iter(live), []
        slot = {i: j for j, i in enumerate(self.slots)}
        for i in range(self.n):
            args.append(getattr(self, f"w{slot[i]}") if i in slot else next(it))
        return self.gm(*args)


def kiln_backend(gm, example_inputs, options=None):
    """``torch.compile(..., options={...})`` hands its options dict over as ``options``: the
    same keywords as ``kiln.compile`` (or a ``kiln.CompileOptions``)."""
    from .api import CompiledModel
    from .options import CompileOptions

    parsed = options if isinstance(options, CompileOptions) or options is None \
        else CompileOptions.parse(**dict(options))
    weights = [i for i, x in enumerate(example_inputs) if _is_weight(x)]
    live = [i for i in range(len(example_inputs)) if i not in set(weights)]
    state = {}

    def build(inputs):
        state["seen"] = [(inputs[i], inputs[i]._version) for i in weights]
        module = _Frozen(gm, inputs, weights) if weights else gm
        state["compiled"] = CompiledModel(module, name="dynamo_graph", options=parsed)
        run.kiln = state["compiled"]

    def run(*args):
        if any(args[i] is not t or t._version != v for i, (t, v) in zip(weights, state["seen"])):
            build(args)  # different or updated weights: compile with them
        return state["compiled"](*[args[i] for i in live])

    build(list(example_inputs))
    return run


def register() -> None:
    """Register the backend by name (also done through the package's entry point)."""
    from torch._dynamo import list_backends, register_backend

    if "kiln" not in list_backends(exclude_tags=()):
        register_backend(name="kiln")(kiln_backend)

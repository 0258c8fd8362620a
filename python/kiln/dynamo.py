"""``torch.compile(model, backend="kiln")``: Kiln as a TorchDynamo backend.

Dynamo hands over each captured FX graph; Kiln compiles it on its first call with the
real inputs (``torch.export`` re-traces the FX module), and recompiles per input shape.
"""
from __future__ import annotations


def kiln_backend(gm, example_inputs, options=None):
    """``torch.compile(..., options={...})`` hands its options dict over as ``options``: the
    same keywords as ``kiln.compile`` (or a ``kiln.CompileOptions``)."""
    from .api import CompiledModel
    from .options import CompileOptions

    parsed = options if isinstance(options, CompileOptions) or options is None \
        else CompileOptions.parse(**dict(options))
    compiled = CompiledModel(gm, name="dynamo_graph", options=parsed)

    def run(*args):
        return compiled(*args)

    run.kiln = compiled  # the CompiledModel, for introspection
    return run


def register() -> None:
    """Register the backend by name (also done through the package's entry point)."""
    from torch._dynamo import list_backends, register_backend

    if "kiln" not in list_backends(exclude_tags=()):
        register_backend(name="kiln")(kiln_backend)

"""Kiln: a deep-learning compiler for PyTorch and ONNX models.

    fast = kiln.compile(model, example_inputs)
    kiln.save(fast, "model.kiln"); fast = kiln.load("model.kiln")   # in another process
    print(kiln.explain(model, example_inputs))
"""
from .errors import KilnError, KilnWarning
from .options import CompileOptions, QuantOptions

__version__ = "0.1.0"


def __getattr__(name):
    # The API pulls in torch and the compiler; load it on first use so `import kiln` is cheap.
    if name in ("compile", "explain", "CompiledModel", "Explanation"):
        from . import api
        return getattr(api, name)
    if name in ("memory_stats", "empty_cache"):  # Kiln's caching allocator (kiln.kernels.allocator)
        from kiln.kernels import allocator
        return getattr(allocator, name)
    if name in ("save", "load"):
        from . import artifact
        return getattr(artifact, name)
    if name == "CompileReport":
        from .report import CompileReport
        return CompileReport
    if name in ("sparsify", "distill"):
        from . import pruning
        return getattr(pruning, name)
    if name in ("sparsity_report", "SparsityReport"):
        from . import sparse_report
        return getattr(sparse_report, name)
    if name in ("quantize_report", "QuantReport"):
        from . import quantize
        return getattr(quantize, name)
    if name in ("serving", "ray"):  # these import Ray (an optional extra): only when asked for
        import importlib
        return importlib.import_module(f".{name}", __name__)
    if name == "models":
        import importlib
        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


__all__ = ["compile", "explain", "save", "load", "CompiledModel", "Explanation", "CompileOptions", "QuantOptions", "CompileReport",
           "KilnError", "KilnWarning", "models", "__version__",
           "sparsify", "distill", "sparsity_report", "SparsityReport", "quantize_report", "QuantReport",
           "memory_stats", "empty_cache"]

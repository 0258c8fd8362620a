"""``kiln.sparsity_report``: what sparsity buys a model, layer by layer and end to end.

    print(kiln.sparsity_report(pruned, inputs, dense_model=model))

Compiles the model twice, with sparse kernels (``sparse="auto"`` unless told otherwise)
and without (``sparse="off"``), and reports for every layer the sparsity pass considered:
its sparsity, the format chosen and why, the measured dense and sparse kernel times and
the chosen kernel's output error against the dense kernel; end to end: both compiled
models' latency (interleaved runs, medians) and the largest output difference between
them. With ``dense_model`` (the model before pruning) it also reports the output error
that pruning itself caused and, with ``data`` (``(inputs, labels)`` batches), top-1
accuracy of the dense model and of the compiled sparse model.
"""
from __future__ import annotations

from dataclasses import field

import torch

from kiln.kernels.timing import median_ms

from .errors import KilnError
from kiln.ir.record import record


@record(frozen=False, slots=False)
class SparsityReport:
    name: str
    layers: list = field(default_factory=list)  # kiln.passes.sparsity.SparseDecision
    dense_ms: float = 0.0  # end to end, Kiln with sparse="off"
    sparse_ms: float = 0.0  # end to end, Kiln with the sparse option
    max_output_diff: float = 0.0  # sparse-compiled vs dense-compiled, same weights
    pruning_error: float | None = None  # pruned vs dense model (max abs output difference)
    accuracy: dict = field(default_factory=dict)  # "dense model" / "kiln sparse" -> top-1
    threads: int = 1

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms else float("nan")

    def __str__(self) -> str:
        lines = [f"sparsity report: {self.name} ({self.threads} thread{'s' if self.threads > 1 else ''})",
                 f"{'layer':<32} {'shape':<18} {'zeros':>6} {'format':<10} {'dense ms':>9} {'sparse ms':>9} "
                 f"{'max err':>9}  reason"]
        for d in self.layers:
            sp = min(d.sparse_ms.values()) if d.sparse_ms else None
            if d.format in d.sparse_ms:
                sp = d.sparse_ms[d.format]
            lines.append(f"{d.layer[-32:]:<32} {'x'.join(map(str, d.shape)):<18} {d.sparsity:>6.1%} {d.format:<10} "
                         f"{_f(d.dense_ms):>9} {_f(sp):>9} {_f(d.max_error, '.1e'):>9}  {d.reason}")
        if not self.layers:
            lines.append("  (no layer with at least half of its weights zero)")
        lines.append(f"end to end: dense {self.dense_ms:.3f} ms, sparse {self.sparse_ms:.3f} ms "
                     f"({self.speedup:.2f}x); max output difference {self.max_output_diff:.2e}")
        if self.pruning_error is not None:
            lines.append(f"pruning: max output difference from the dense model {self.pruning_error:.3e}")
        for k, v in self.accuracy.items():
            lines.append(f"top-1 accuracy, {k}: {v:.2%}")
        return "\n".join(lines)


def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _as_tuple(inputs):
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _top1(fn, data) -> float:
    right = total = 0
    with torch.no_grad():
        for x, y in data:
            pred = _first(fn(*_as_tuple(x))).argmax(-1)
            right += int((pred == y).sum())
            total += y.numel()
    return right / max(total, 1)


def time_interleaved(fns: list, inputs: tuple, repeats: int) -> list[float]:
    """Median ms of each function, the runs interleaved (a load burst hits all alike)."""
    return median_ms([lambda f=f: f(*inputs) for f in fns], repeats, warmup=1)


def sparsity_report(model, inputs, *, dense_model=None, data=None, sparse: str = "auto", repeats: int = 20,
                    **compile_options) -> SparsityReport:
    """Compile ``model`` with and without sparse kernels and report (see the module doc)."""
    from .api import compile as kiln_compile

    if sparse == "off":
        raise KilnError("sparsity_report compares sparse kernels with dense ones: sparse must not be 'off'")
    inputs = _as_tuple(inputs)
    model = model.eval()
    dense_k = kiln_compile(model, inputs, sparse="off", **compile_options)
    sparse_k = kiln_compile(model, inputs, sparse=sparse, **compile_options)
    rep = SparsityReport(type(model).__name__, threads=torch.get_num_threads())
    rep.layers = list(sparse_k.report.sparsity)
    with torch.no_grad():
        a, b = _first(dense_k(*inputs)), _first(sparse_k(*inputs))
        rep.max_output_diff = float((a - b).abs().max())
        if dense_model is not None:
            rep.pruning_error = float((_first(dense_model.eval()(*inputs)) - _first(model(*inputs))).abs().max())
    rep.dense_ms, rep.sparse_ms = time_interleaved([dense_k, sparse_k], inputs, repeats)
    if data is not None:
        if dense_model is not None:
            rep.accuracy["dense model (eager)"] = _top1(dense_model, data)
        rep.accuracy["pruned model (eager)"] = _top1(model, data)
        rep.accuracy["pruned model (kiln, sparse kernels)"] = _top1(sparse_k, data)
    return rep

"""``kiln.quantize_report``: what quantization does to a model, layer by layer and end to end.

It compiles the model twice (float32, and with ``quantize=...``), lists the per-layer
decisions the quantize pass made (layer, shape, scheme, SQNR against float32, float32 and
quantized time, decision, reason), and measures the whole model: output SQNR and max
error against the float32 compile, and both latencies (interleaved runs, medians).
"""
from __future__ import annotations

from dataclasses import field

import torch

from kiln.kernels.timing import median_ms

from .errors import KilnError
from kiln.ir.record import record


@record(frozen=False, slots=False)
class QuantReport:
    model: str
    scheme: str
    layers: list = field(default_factory=list)  # kiln.passes.quantize_payoff.LayerDecision (compiled.report)
    output_sqnr_db: float = float("nan")
    max_abs_err: float = float("nan")
    fp32_ms: float = float("nan")
    quant_ms: float = float("nan")
    kernels: dict = field(default_factory=dict)

    @property
    def quantized_layers(self) -> int:
        return sum(1 for d in self.layers if d.quantized)

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.quant_ms if self.quant_ms > 0 else float("nan")

    def table(self) -> str:
        def ms(v):
            return "-" if v is None else f"{v:.3f}"
        head = "| layer | op | shape | scheme | SQNR dB | fp32 ms | quant ms | decision | reason |"
        rows = [head, "|" + "---|" * 9]
        for d in self.layers:
            rows.append(f"| {d.layer} | {d.op} | {d.shape} | {d.scheme} | {d.sqnr_db:.1f} | {ms(d.fp32_ms)} | "
                        f"{ms(d.quant_ms)} | {'int' if d.quantized else 'float'} | {d.reason} |")
        return "\n".join(rows)

    def __str__(self) -> str:
        return (f"{self.model} quantize={self.scheme}: {self.quantized_layers}/{len(self.layers)} layers quantized\n"
                f"end to end: output SQNR {self.output_sqnr_db:.1f} dB, max abs error {self.max_abs_err:.4g}, "
                f"float32 {self.fp32_ms:.2f} ms, quantized {self.quant_ms:.2f} ms ({self.speedup:.2f}x)\n"
                f"kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels.items())) + "\n"
                + self.table() + "\n")


def _flat(out) -> list[torch.Tensor]:
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def quantize_report(model, example_inputs, quantize: str = "int8-dynamic", calibration=None, repeats: int = 10,
                    **options) -> QuantReport:
    """Compile ``model`` in float32 and with ``quantize``; report each layer's decision and
    the end-to-end accuracy and speed on ``example_inputs``."""
    from kiln.ir import qformat

    from .api import CompiledModel

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    fp = CompiledModel(model, example_inputs, **{k: v for k, v in options.items() if k == "target"})
    q = CompiledModel(model, example_inputs, quantize=quantize, calibration=calibration, **options)
    decisions = list(q.report.quantization)  # none for bf16: every GEMM/conv runs in bfloat16
    ref, out = _flat(fp(*example_inputs)), _flat(q(*example_inputs))
    if not ref:
        raise KilnError("quantize_report needs a model with floating-point outputs")
    sq = min(qformat.sqnr_db(r, o) for r, o in zip(ref, out))
    err = max(float((r - o).abs().max()) for r, o in zip(ref, out))
    fp_ms, q_ms = median_ms([lambda: fp(*example_inputs), lambda: q(*example_inputs)], repeats, warmup=2)
    name = getattr(q, "name", type(model).__name__)
    return QuantReport(name, quantize, decisions, sq, err, fp_ms, q_ms, dict(q.report.kernels))

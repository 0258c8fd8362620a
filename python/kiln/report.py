"""``CompileReport``: what one compile decided, and what it cost.

Every decision a compile makes comes back here, not through lists passed in: the ops that
fell back to PyTorch, the kernel each node runs in, the quantization and sparsity
decisions per layer, the passes that ran, where time went, and whether the caches hit.
``compiled.report`` is the report of a ``CompiledModel``'s latest specialization.
"""
from __future__ import annotations

from dataclasses import field

from .options import CompileOptions
from kiln.ir.record import record


@record(frozen=False, slots=False)
class CompileReport:
    """What a compile decided and measured: kernels, fallbacks, timings, memory."""
    model: str
    target: str
    options: CompileOptions
    input_shapes: tuple = ()  # the shapes this specialization was compiled for
    fallbacks: list = field(default_factory=list)  # (aten op, module scope, why)
    kernels: dict = field(default_factory=dict)  # kernel name -> steps that run it
    node_kernels: list = field(default_factory=list)  # (node label, kernel name) in graph order
    quantization: list = field(default_factory=list)  # kiln.passes.quantize_payoff.LayerDecision
    sparsity: list = field(default_factory=list)  # kiln.passes.sparsity.SparseDecision
    passes: list = field(default_factory=list)  # kiln.passes.pipeline.PassRecord
    seconds: dict = field(default_factory=dict)  # import, passes, plan (kernel choice), codegen, total
    import_cache_hit: bool = False  # the imported graph came from the import cache (no torch.export)
    compile_cache_hit: bool = False  # the kernel choices came from the compile cache (no measuring)
    memory: object = None  # kiln.runtime.plan.MemoryStats
    graph_nodes: int = 0
    artifact: str = ""  # the file this plan was loaded from (kiln.load); empty for a compile
    rechosen: list = field(default_factory=list)  # (node, recorded kernel, why) chosen again at load
    # the end-to-end check of approximate kernels (Winograd): what it measured and decided
    # (empty: the plan uses none, or its choices came from the compile cache)
    accuracy: str = ""
    # whether a large batch runs in chunks of samples (runtime/chunks.py), and why (or why not)
    batch_chunks: str = ""

    @property
    def quantized_layers(self) -> int:
        return sum(1 for d in self.quantization if d.quantized)

    def __str__(self) -> str:
        secs = ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())
        lines = [f"{self.model} on {self.target}, inputs {list(map(list, self.input_shapes))}: "
                 f"{self.graph_nodes} nodes; {secs}"]
        if self.artifact:
            lines.append(f"loaded from {self.artifact}" + (f"; {len(self.rechosen)} kernel(s) chosen again here"
                                                           if self.rechosen else ""))
            lines += [f"  {node}: {kernel} ({why})" for node, kernel, why in self.rechosen]
        else:
            lines.append(f"caches: import {'hit' if self.import_cache_hit else 'miss'}, "
                         f"compile {'hit' if self.compile_cache_hit else 'miss'}")
        lines.append(f"fallbacks: {len(self.fallbacks)}")
        for op, scope, why in self.fallbacks:
            lines.append(f"  {op}" + (f" at {scope}" if scope else "") + f": {why}")
        lines.append("kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels.items())))
        if self.accuracy:
            lines.append(f"accuracy: {self.accuracy}")
        if self.batch_chunks:
            lines.append(f"batch: {self.batch_chunks}")
        if self.quantization:
            lines.append(f"quantization: {self.quantized_layers}/{len(self.quantization)} layers integer")
            lines += [f"  {d.layer}: {'int' if d.quantized else 'float'} ({d.reason})" for d in self.quantization]
        if self.sparsity:
            lines.append("sparsity:")
            lines += [f"  {d.layer}: {d.format} ({d.reason})" for d in self.sparsity]
        if self.memory is not None:
            lines.append(f"memory: peak intermediate buffers {self.memory.peak_bytes / 2**20:.1f} MiB")
        return "\n".join(lines)

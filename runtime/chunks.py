"""A dynamic plan's batch run in chunks of samples, so a large batch holds a chunk's buffers.

A plan allocates each intermediate for the whole call: a vision model's batch of 32 holds
32 images' activations at once, and a dynamic plan meets every batch size of its stream,
each one a new shape for oneDNN's primitive and reorder caches. Where the graph computes
each sample on its own (``passes.separable``), a call larger than ``rows`` samples runs as
a few balanced chunks of at most ``rows`` (20 as 10 + 10, not 16 + 4), their outputs joined:
the same rows, up to the summation order a kernel picks for the smaller shape, with the
intermediates of one chunk and at most ``rows`` batch sizes for the caches to see.

``rows`` is at least ``MIN_ROWS`` (kernels keep their efficiency: a chunk's convolutions
and GEMMs see as many rows as a batch of 16 gives them) and otherwise what keeps a chunk's
intermediates under ``BUDGET_BYTES``; a model whose samples are small (an MLP's) then has
chunks larger than any batch it serves, and runs as before. ``CompileOptions.batch_chunk``
sets ``rows`` (or 0: never) instead. Only host-run plans whose one symbolic size is the
batch chunk: with a sequence length too, a chunk's row count would depend on it.
"""
from __future__ import annotations

import math

import torch

from kiln.ir import Graph
from kiln.ir.record import record

from .buffers import memory_stats

MIN_ROWS = 16
BUDGET_BYTES = 32 << 20


@record(slots=False)
class BatchChunks:
    """How a plan splits a call: the batch's ``size`` name, at most ``rows`` samples per
    chunk, and per plan input whether it is split (it leads with the batch) or shared."""
    size: str
    rows: int
    split: tuple[bool, ...]

    def run(self, forward, inputs: list, consts: dict) -> list:
        n = next(x.shape[0] for x, s in zip(inputs, self.split) if s)
        if n <= self.rows:
            return forward(inputs, consts)
        count = -(-n // self.rows)
        base, extra = divmod(n, count)
        parts: list[list] = []
        start = 0
        for i in range(count):
            end = start + base + (i < extra)
            outs = forward([x[start:end] if s else x for x, s in zip(inputs, self.split)], consts)
            if not parts:
                parts = [[] for _ in outs]
            for p, o in zip(parts, outs):
                p.append(o)
            start = end
        return [torch.cat(p) for p in parts]


def sample_bytes(outputs, dead, size: str) -> int:
    """The most intermediate bytes one sample holds at once (the plan's sweep at batch 1)."""
    return memory_stats(outputs, dead, sizes={size: 1}).peak_bytes


def plan_chunks(graph: Graph, outputs, dead, setting: int | None) -> tuple[BatchChunks | None, str]:
    """(the chunking, or None, and a line saying what was decided and why) for a plan whose
    units produce ``outputs`` and free ``dead`` (``runtime.buffers``). ``setting``: None
    decides from the sizes, 0 never chunks, n chunks at n samples. Nothing to say (None,
    "") for a plan of static shapes."""
    if not any(v.type.symbols for v in graph.inputs):
        return None, ""
    if setting == 0:
        return None, "batch not chunked (batch_chunk=0)"
    from kiln.passes.separable import separable_batch  # (a static plan's load never needs it)

    sep = separable_batch(graph)
    if sep.size is None:
        return None, f"batch not chunked: {sep.why}"
    per_sample = sample_bytes(outputs, dead, sep.size)
    rows = setting if setting is not None else max(MIN_ROWS, math.ceil(BUDGET_BYTES / max(per_sample, 1)))
    split = tuple(sep.size in v.type.symbols for v in graph.inputs)
    return (BatchChunks(sep.size, rows, split),
            f"{sep.size} in chunks of at most {rows} ({per_sample / 2**20:.1f} MiB of intermediates a sample)")

"""The pass pipeline: one explicit, ordered list of named phases.

    canonicalize -> fold -> fuse -> precision -> quantize -> precision_rest -> layout -> sparsify -> partition

(``precision`` runs only for ``precision="bf16"`` without ``quantize``, ``quantize`` only
for ``quantize="int8-..."/"int4-weight"``, ``precision_rest`` for both together: the layers
left float by quantization become bf16; ``sparsify`` only when the ``sparse`` option is
not "off".) ``run_pipeline`` runs them in order for one ``CompileOptions``; its ``passes``
field (or ``select``) chooses phases or single passes by name, and a name prefixed with
``-`` skips it. Every pass run is timed and counted; ``on_pass`` receives (pass record,
graph before, graph after) so the dump tool can show what each pass did. With
``verify=True`` (``KILN_VERIFY=1``; always in tests) the IR verifier runs after every pass.
Passes that measure get the driver's ``Measurer`` through their ``PassContext``.
"""
from __future__ import annotations

import time
from dataclasses import field
from typing import Callable, Iterable

from kiln.errors import KilnError
from kiln.ir import Graph, verify
from kiln.options import CompileOptions
from kiln.ir.record import record

from . import attention, epilogue, fold, precision, quantize, recognize, rnn, rows, simplify, sparsity
from .horizontal import fuse_sibling_linears
from .context import Decisions, Measurer, PassContext
from .cse import cse
from .layout import channels_last
from .partition import Partition, partition, verify_partition
from .quantize_payoff import quantize_pass
from .rewrite import dead_code_elimination, rewrite


@record(slots=False)
class Pass:
    name: str
    fn: Callable[[Graph], Graph]
    when: Callable[[PassContext], bool] | None = None  # runs only in compiles it accepts
    with_context: bool = False  # fn(graph, ctx): a pass whose decisions depend on the compile


def rules_pass(name: str, rules, when=None) -> Pass:
    return Pass(name, lambda g: rewrite(g, rules, name=name), when)


def _bf16(ctx: PassContext) -> bool:
    return ctx.options.precision == "bf16"


def _bf16_first(ctx: PassContext) -> bool:
    """bf16 before quantization: a bf16 compile without integer quantization. With both,
    the layers quantization takes stay integer and the rest becomes bf16 (``_bf16_rest``)."""
    return _bf16(ctx) and ctx.options.quantize is None


def _bf16_rest(ctx: PassContext) -> bool:
    return _bf16(ctx) and ctx.options.quantize is not None


def _bf16_rnn(ctx: PassContext) -> bool:
    """bf16 LSTM / GRU layers where their bf16 kernels run (a CPU compile on a CPU with AMX-BF16
    or AVX512-BF16)."""
    if not _bf16(ctx) or ctx.target != "cpu":
        return False
    try:
        from kiln import _C
    except ImportError:  # no native module: the layers stay fp32 (the reference runs them)
        return False
    return _C.rnn_amx_supported() or _C.rnn_dot_bf16_supported()


def _sparse(ctx: PassContext) -> bool:
    return ctx.options.sparse != "off"


def _quantize(ctx: PassContext) -> bool:
    return ctx.options.quantize is not None


def _hoist_rnn_projections(ctx: PassContext) -> bool:
    # The CPU kernels of a recurrent layer choose by measurement whether to project its input
    # inside the recurrence or up front; the cuda kernels take the hoisted form, and the
    # quantizer needs the projection as a LINEAR of its own.
    # With precision="bf16" on a CPU that runs whole bf16 layers, the layer stays whole:
    # the bf16 recurrence with its projection inside beats an int8 projection up front plus
    # a float recurrence.
    if ctx.target == "cpu" and _quantize(ctx) and _bf16_rnn(ctx):
        return False
    return ctx.target != "cpu" or _quantize(ctx)


def _cpu_float(ctx: PassContext) -> bool:
    """Float CPU compiles (quantized GEMMs take their residual inside their own epilogue)."""
    return ctx.target == "cpu" and not _quantize(ctx)


CLEANUP = [rules_pass("simplify", simplify.RULES), Pass("cse", cse), Pass("dce", dead_code_elimination)]

PHASES: list[tuple[str, list[Pass]]] = [
    ("canonicalize", [*CLEANUP, Pass("demanded_rows", rows.push_row_slices)]),
    ("fold", [rules_pass("constant_fold", fold.CONSTANT_FOLD), rules_pass("fold_bn", fold.FOLD_BN),
              rules_pass("fold_pad", fold.FOLD_PAD), *CLEANUP]),
    ("fuse", [rules_pass("recognize", recognize.RULES), rules_pass("attention", attention.RULES),
              rules_pass("rnn", rnn.SPLIT), rules_pass("rnn_hoist", rnn.HOIST, when=_hoist_rnn_projections),
              rules_pass("constant_fold", fold.CONSTANT_FOLD),
              rules_pass("epilogue", epilogue.RULES),
              rules_pass("residual_to_norm", epilogue.RESIDUAL_TO_NORM, when=_cpu_float),
              rules_pass("conv_relu6", epilogue.CONV_RELU6, when=_cpu_float),
              Pass("horizontal", fuse_sibling_linears), *CLEANUP]),
    # the round-trip rule runs again after CSE has merged duplicate casts (a value read by
    # two bf16 consumers has two casts, so two uses, until then)
    ("precision", [rules_pass("bf16", precision.RULES, when=_bf16_first),
                   rules_pass("bf16_rnn", precision.RNN_RULES, when=lambda c: _bf16_first(c) and _bf16_rnn(c)),
                   *[Pass(p.name, p.fn, _bf16_first) for p in CLEANUP],
                   rules_pass("bf16_round_trips", precision.ROUND_TRIPS, when=_bf16_first),
                   *[Pass(p.name, p.fn, _bf16_first) for p in CLEANUP]]),
    ("quantize", [Pass("quantize", quantize_pass, _quantize, with_context=True),
                  *[Pass(p.name, p.fn, _quantize) for p in CLEANUP]]),
    # quantize= with precision="bf16": integer where the payoff rule quantized, bf16 for the
    # rest (attention, recurrences, layers quantization left float)
    ("precision_rest", [rules_pass("bf16_rest", precision.RULES, when=_bf16_rest),
                        rules_pass("bf16_rnn_rest", precision.RNN_RULES,
                                   when=lambda c: _bf16_rest(c) and _bf16_rnn(c)),
                        *[Pass(p.name, p.fn, _bf16_rest) for p in CLEANUP],
                        rules_pass("bf16_round_trips_rest", precision.ROUND_TRIPS, when=_bf16_rest),
                        *[Pass(p.name, p.fn, _bf16_rest) for p in CLEANUP]]),
    ("layout", [Pass("channels_last", channels_last)]),
    ("sparsify", [Pass("sparsify", sparsity.sparsify, _sparse, with_context=True)]),
    ("partition", []),  # the cut into kernel groups; it rewrites the graph only to clone cheap shared tails
]
PHASE_NAMES = [p for p, _ in PHASES]
PASS_NAMES = sorted({p.name for _, ps in PHASES for p in ps})


@record(frozen=False, slots=False)
class PassRecord:
    phase: str
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


@record(frozen=False, slots=False)
class PipelineResult:
    graph: Graph
    partition: Partition | None
    records: list[PassRecord] = field(default_factory=list)
    decisions: Decisions = field(default_factory=Decisions)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)


def check_selection(select) -> None:
    """Raise ``KilnError`` naming the phases and passes when ``select`` names an unknown one."""
    unknown = [s for s in select or () if s.lstrip("-") not in PHASE_NAMES + PASS_NAMES]
    if unknown:
        raise KilnError(f"unknown pass or phase {unknown}; phases: {', '.join(PHASE_NAMES)}; "
                        f"passes: {', '.join(PASS_NAMES)}")


def _enabled(select: Iterable[str] | None):
    if select is None:
        return lambda phase, name: True
    select = list(select)
    if not select:
        return lambda phase, name: False
    check_selection(select)
    skip = {s[1:] for s in select if s.startswith("-")}
    keep = {s for s in select if not s.startswith("-")}

    def on(phase: str, name: str) -> bool:
        if phase in skip or name in skip:
            return False
        return not keep or phase in keep or name in keep

    return on


_ALL = object()


def run_pipeline(graph: Graph, options: CompileOptions | None = None, *, select=_ALL,
                 on_pass: Callable[[PassRecord, Graph, Graph], None] | None = None,
                 verify_each: bool | None = None, measure: Measurer | None = None) -> PipelineResult:
    """Run the phases ``options`` selects (``select``, when given, overrides ``options.passes``)."""
    ctx = PassContext(options if options is not None else CompileOptions(), measure)
    on = _enabled(ctx.options.passes if select is _ALL else select)
    if verify_each is None:
        verify_each = ctx.options.verify
    from kiln.progress import log

    logger = log("passes")
    records: list[PassRecord] = []
    for phase, passes in PHASES:
        for p in passes:
            if not on(phase, p.name) or (p.when is not None and not p.when(ctx)):
                continue
            t = time.perf_counter()
            after = p.fn(graph, ctx) if p.with_context else p.fn(graph)
            rec = PassRecord(phase, p.name, time.perf_counter() - t, len(graph.nodes), len(after.nodes))
            records.append(rec)
            if verify_each:
                try:
                    verify(after)
                except Exception as e:
                    raise RuntimeError(f"pass {phase}/{p.name} produced an invalid graph: {e}") from e
            logger.info(f"{phase}/{p.name}: {rec.nodes_before} -> {rec.nodes_after} nodes "
                        f"in {rec.seconds * 1e3:.1f} ms")
            if on_pass is not None:
                on_pass(rec, graph, after)
            graph = after
    part = None
    if on("partition", "partition"):
        t = time.perf_counter()
        part = partition(graph)
        graph = part.graph  # with any tail nodes the partition cloned
        if verify_each:
            verify(graph)
            verify_partition(part)
        records.append(PassRecord("partition", "partition", time.perf_counter() - t, len(graph.nodes),
                                  len(graph.nodes)))
    return PipelineResult(graph, part, records, ctx.decisions)

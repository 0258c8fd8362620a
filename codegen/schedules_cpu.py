"""The CPU schedule template for generated kernel groups, with its search space.

``schedule_group`` takes the TensorIR of a rendered group (``kiln.codegen.tvm.render``: a
block per output and per reduction): reductions are rfactored into vectorized partial
results (loops reordered to storage order first where a reduction would walk the innermost
storage axis with a stride: column sums, group norms over channels-last images), spatial
loop nests are fused, vectorized and split into parallel tasks. The knobs are the
space declared beside it with ``@space``; ``tune_space`` drops the knobs that cannot matter
for a given group and thread count, so the tuner does not measure duplicates.
"""
from __future__ import annotations

import math

from kiln.codegen.autotune import Space, space
from kiln.ir import OpKind


# grain: elements per parallel task. The default, 64K, parallelizes a loop nest only from 128K
# elements: below that, starting the parallel tasks (on TVM's pool, and on the OpenMP launcher
# that loaded kernels use, kernels/generated.py) cost about as much as the work they split,
# and smaller grains did not pay for elementwise or LayerNorm groups. The tuner tries the
# other grains.
@space(vector=[16, 8, 32, 64], grain=[1 << 16, 1 << 14, 1 << 18], rvector=[16, 8, 0], unroll=[0, 4])
def schedule_group(sch, outputs: list[str], config: dict, threads: int) -> None:
    """Inline every injective stage that is not one of ``outputs`` into its consumers (the
    renderer makes none; a hand-written TE function may). Then each reduction block: split
    its (fused) reduction loop into [outer, ``rvector`` lanes] and rfactor the lanes, so a
    vectorized block accumulates ``rvector`` partial results per row and a short block
    combines them; unroll the outer reduction loop by ``unroll``. Each spatial loop nest:
    fuse, split into [parallel tasks of ``grain`` elements, ..., ``vector`` lanes] and
    vectorize the lanes when they divide the extent. Parallel loops only when ``threads > 1``
    and the nest holds at least two tasks of ``grain`` elements (a reduction: its rows times
    their length)."""
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(b).name_hint
        if name in outputs or _is_reduction(sch, b):
            continue
        sch.compute_inline(b)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if _is_reduction(sch, b):
            _schedule_reduction(sch, b, config, threads)
        else:
            _schedule_spatial(sch, b, config, threads)


def _spatial_reduce_loops(sch, b):
    loops = sch.get_loops(b)
    n_spatial = sum(1 for iv in sch.get(b).iter_vars if int(iv.iter_type) == 0)
    return loops[:n_spatial], loops[n_spatial:]


def _extent(sch, loop) -> int | None:
    """The loop's trip count; None when it is a symbolic size (known only per call)."""
    ext = sch.get(loop).extent
    return int(ext.value) if hasattr(ext, "value") else None


def _split_symbolic(sch, loops):
    """``loops`` as (the loops up to the last one of symbolic extent, the static rest), so
    the static rest can be fused and vectorized: a symbolic loop cannot be split into whole
    vectors."""
    k = max((i + 1 for i, lp in enumerate(loops) if _extent(sch, lp) is None), default=0)
    return loops[:k], loops[k:]


def _fuse(sch, loops):
    return loops[0] if len(loops) == 1 else sch.fuse(*loops)


def _schedule_reduction(sch, b, config: dict, threads: int) -> None:
    spatial, red = _spatial_reduce_loops(sch, b)
    strided = _strided_reduction(sch, b, spatial, red)
    if strided is not None:
        _schedule_strided_reduction(sch, b, spatial, red, *strided, threads=threads, grain=config["grain"],
                                    rvector=config["rvector"])
        return
    if _column_reduction(sch, b, spatial):
        _schedule_column_reduction(sch, b, spatial, red, config, threads)
        return
    r = _fuse(sch, red)
    rv = config["rvector"]
    ext = _extent(sch, r)
    if rv and ext % rv == 0 and ext >= 2 * rv:
        ko, ki = sch.split(r, [None, rv])
        rf = sch.rfactor(ki, len(spatial))  # the lanes innermost: contiguous vector stores
        rf_loops = sch.get_loops(rf)  # [spatial..., ko, ki]; ki is a spatial lane of the rf block
        sch.vectorize(rf_loops[-1])
        _unroll(sch, rf_loops[-2], config["unroll"])
        _parallel_rows(sch, rf_loops[:len(spatial)], threads, ext, config["grain"])
        spatial = sch.get_loops(b)[:len(spatial)]  # the combining block: [spatial..., lanes]
    else:
        _unroll(sch, r, config["unroll"])
    _parallel_rows(sch, spatial, threads, ext, config["grain"])


def _column_reduction(sch, b, spatial) -> bool:
    """A reduction over outer axes whose innermost axis is kept: every read indexes its last
    (contiguous) axis with the block's last spatial variable and no read's last index is
    reduced (a channels-last image summed over H and W per channel, ConvNeXt V2's GRN). The
    row schedule would walk each column down its stride, one cache line per element."""
    if not spatial or _extent(sch, spatial[-1]) in (None, 1):
        return False
    blk = sch.get(b)
    ivs = list(blk.iter_vars)
    n_spatial = len(spatial)
    last = ivs[n_spatial - 1].var
    reduced = [iv.var for iv in ivs[n_spatial:]]
    hit = False
    for r in blk.reads:
        if not r.region:
            continue
        idx = r.region[-1].min
        if idx.same_as(last):
            hit = True
        elif any(_uses(idx, v) for v in reduced):
            return False
    return hit


def _strided_reduction(sch, b, spatial, red):
    """``(K, kept)`` when a read's innermost index takes the reduction variable ``r`` as
    ``r // K``: the reduction walks the innermost storage axis slowest (a group norm over a
    channels-last image, rendered as a layer norm over each group's NCHW-ordered elements:
    ``r = c * H * W + hw`` reads ``x[hw, g * cg + c]``). ``kept``: the positions of the
    spatial loops that index that axis too (the group ``g``)."""
    if len(red) != 1 or _extent(sch, red[0]) is None:
        return None
    blk = sch.get(b)
    ivs = list(blk.iter_vars)
    r, ext = ivs[len(spatial)].var, _extent(sch, red[0])
    for rd in blk.reads:
        if not rd.region:
            continue
        idx = rd.region[-1].min
        for k in _floordiv_factors(idx, r):
            if 1 < k < ext and ext % k == 0:
                return k, [i for i in range(len(spatial)) if _uses(idx, ivs[i].var)]
    return None


def _floordiv_factors(expr, var) -> list[int]:
    from tvm import tirx

    return [int(e.b.value) for e in _subexprs(expr)
            if isinstance(e, tirx.FloorDiv) and e.a.same_as(var) and isinstance(e.b, tirx.IntImm)]


def _subexprs(expr):
    """Every node of an index expression (arithmetic: binary ops, casts, variables, constants)."""
    stack = [expr]
    while stack:
        e = stack.pop()
        yield e
        stack.extend(getattr(e, f) for f in ("a", "b", "value")
                     if hasattr(e, f) and not isinstance(getattr(e, f), (int, float)))


def _schedule_strided_reduction(sch, b, spatial, red, k: int, kept: list, threads: int, grain: int,
                                rvector: int) -> None:
    """The reduction loop split as ``r = hi * K + lo`` and the loops put in storage order:
    the other spatial loops, ``lo``, the kept spatial loops, ``hi`` innermost. Each step then
    reads one contiguous run (all groups' channels at one pixel) instead of one element a
    cache line; with kept loops inside the reduction, the init moves into a block of its own."""
    ext = _extent(sch, red[0])
    hi, lo = sch.split(red[0], [ext // k, k])
    inner = [spatial[i] for i in kept]
    outer = [lp for i, lp in enumerate(spatial) if i not in kept]
    sch.reorder(*outer, lo, *inner, hi)
    rows = math.prod(_extent(sch, lp) or 1 for lp in outer)
    parallel = threads > 1 and rows > 1 and \
        rows * ext * max(1, math.prod(_extent(sch, lp) or 1 for lp in inner)) >= 2 * grain
    if inner:  # independent sums side by side (one per kept index): no chain to break up
        if parallel:
            sch.parallel(_fuse(sch, outer))
        sch.decompose_reduction(b, lo)
        return
    # one sum per row: its contiguous innermost run split into ``rvector`` lanes of partial
    # sums (rfactored, vectorized), as the row schedule does, so no single add chain serializes it
    if rvector and (ext // k) % rvector == 0 and ext // k >= 2 * rvector:
        _, lanes = sch.split(hi, [None, rvector])
        rf = sch.rfactor(lanes, len(spatial))
        sch.vectorize(sch.get_loops(rf)[-1])
        if parallel:
            sch.parallel(_fuse(sch, sch.get_loops(rf)[:len(outer)]))
        spatial_now = sch.get_loops(b)[:len(outer)]
        if parallel:
            sch.parallel(_fuse(sch, spatial_now))
    elif parallel:
        sch.parallel(_fuse(sch, outer))


def _uses(expr, var) -> bool:
    return any(e.same_as(var) for e in _subexprs(expr))


def _schedule_column_reduction(sch, b, spatial, red, config: dict, threads: int) -> None:
    """Reduction loops outside the kept innermost axis: each step of the reduction reads one
    contiguous run and accumulates it into a row of partial sums (the row of ``spatial[-1]``
    outputs stays in L1; LLVM vectorizes that loop); the init moves into a block of its own
    ahead of the reduction loops. Parallel tasks: the outer kept loops, or else chunks of the kept
    axis, when there is work for two grains."""
    inner = spatial[-1]
    ext = _extent(sch, inner)
    rows = math.prod(_extent(sch, lp) or 1 for lp in red) * math.prod(_extent(sch, lp) or 1 for lp in spatial)
    outer = list(spatial[:-1])
    vec = config["vector"]
    lanes_ok = vec > 1 and ext % vec == 0 and ext > vec
    if threads > 1 and rows >= 2 * config["grain"] and ext // max(vec, 1) >= 2 * threads and \
            math.prod(_extent(sch, lp) or 1 for lp in outer) < threads:
        chunks = threads
        while ext % chunks or (lanes_ok and (ext // chunks) % vec):
            chunks -= 1
        if chunks > 1:
            task, inner = sch.split(inner, [chunks, None])
            outer.append(task)
    sch.reorder(*outer, *red, inner)
    if threads > 1 and outer and rows >= 2 * config["grain"]:
        sch.parallel(_fuse(sch, outer))
    sch.decompose_reduction(b, red[0])
    # the innermost loop is left to LLVM's loop vectorizer: TensorIR refuses to vectorize a
    # loop under a reduction block's reduction loops


def _unroll(sch, loop, factor: int) -> None:
    ext = _extent(sch, loop)
    if factor and ext > factor and ext % factor == 0:
        _, inner = sch.split(loop, [None, factor])
        sch.unroll(inner)


def _parallel_rows(sch, spatial, threads: int, row_length: int, grain: int) -> None:
    if not spatial:
        return
    fused = _fuse(sch, spatial)
    rows = _extent(sch, fused)
    if rows is None:  # rows known only per call: see _run_time_parallel
        if threads > 1:
            sch.parallel(fused)
        return
    if threads > 1 and rows > 1 and rows * row_length >= 2 * grain:
        sch.parallel(fused)


# _run_time_parallel: a loop over symbolic rows (BERT's [batch, seq, 768]) is always built
# parallel, since how many rows a call brings is known only then: a LayerNorm over 384 tokens
# is worth both threads, one over 16 is not. ``GeneratedKernel`` runs a call of less than two
# grains of work on the calling thread alone (kiln._C's launcher, tvm_parallel_serial), the
# rule the static loop nests follow at build time.


def _schedule_spatial(sch, b, config: dict, threads: int) -> None:
    loops = sch.get_loops(b)
    if not loops:
        return
    outer, inner = _split_symbolic(sch, loops)
    if outer:
        _schedule_symbolic_spatial(sch, outer, inner, config, threads)
        return
    extent = math.prod(_extent(sch, lp) for lp in loops)
    vec = config["vector"]
    parallel = threads > 1 and extent >= 2 * config["grain"]
    if not (vec > 1 and extent % vec == 0 and extent > vec) and not parallel:
        # no whole vectors and no tasks: the nest stays as it is, its indices plain loop
        # counters (a fused loop would recompute every coordinate by division), and LLVM's
        # loop vectorizer takes the innermost loop with a scalar remainder
        return
    fused = _fuse(sch, loops)
    if vec > 1 and extent % vec == 0 and extent > vec:
        outer, lanes = sch.split(fused, [None, vec])
        sch.vectorize(lanes)
    else:
        outer, vec = fused, 1
    if parallel:
        per_task = max(1, config["grain"] // vec)
        if extent // vec > per_task:
            po, _ = sch.split(outer, [None, per_task])
            sch.parallel(po)


def _schedule_symbolic_spatial(sch, outer, inner, config: dict, threads: int) -> None:
    """A loop nest whose leading loops have symbolic extents: the static inner loops fused
    and vectorized as in ``_schedule_spatial``. Parallel tasks: a static inner extent of two
    grains or more (a channels-last image per batch row) is split into tasks of ``grain``
    elements, fused with the symbolic loops and run in parallel; a shorter one (a BERT row)
    leaves the symbolic loops whole and parallel (_run_time_parallel)."""
    row, lanes_outer, vec = 1, None, 1
    if inner:
        lanes_outer = _fuse(sch, inner)
        row = _extent(sch, lanes_outer)
        vec = config["vector"]
        if vec > 1 and row % vec == 0 and row > vec:
            lanes_outer, lanes = sch.split(lanes_outer, [None, vec])
            sch.vectorize(lanes)
        else:
            vec = 1
    grain = config["grain"]
    if threads > 1 and lanes_outer is not None and row >= 2 * grain and row // vec > grain // vec:
        task, _ = sch.split(lanes_outer, [None, max(1, grain // vec)])
        sch.parallel(_fuse(sch, list(outer) + [task]))
        return
    fused = _fuse(sch, outer)
    if threads > 1:  # see _run_time_parallel
        sch.parallel(fused)


def tune_space(group, threads: int):
    """The template's space without knobs that cannot matter for ``group``: no task grain
    on one thread (no parallel loop), no reduction unrolling without a reduction."""
    anchored = any(n.op in _REDUCING for n in group.nodes)
    axes = tuple((k, v[:1] if (k == "grain" and threads == 1) or (k in ("unroll", "rvector") and not anchored)
                  else v)
                 for k, v in schedule_group.tune_space.axes)
    return Space(axes, schedule_group.tune_space.valid)


_REDUCING = {OpKind.SUM, OpKind.MEAN, OpKind.MAX, OpKind.MIN, OpKind.SOFTMAX, OpKind.LOG_SOFTMAX,
             OpKind.LAYER_NORM}


def _is_reduction(sch, b) -> bool:
    return any(int(iv.iter_type) != 0 for iv in sch.get(b).iter_vars)

"""Generated TensorIR kernels: every op kind the renderer covers, fused chains, layouts and
dtypes, each checked against the torch reference; tuning through the real tuner and
database; the compiled-module cache across processes; a model end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tvm")

from kiln.codegen import tvm as tvm_codegen  # noqa: E402
from kiln.codegen import tvm_expr_size  # noqa: E402
from kiln.codegen.autotune import Budget, TuningDB  # noqa: E402
from kiln.codegen.schedules_cpu import schedule_group  # noqa: E402
from kiln.ir import DType, GraphBuilder, Layout, LayoutKind, OpKind, Sym  # noqa: E402
from kiln.ir import attrs as A  # noqa: E402
from kiln.codegen import tvm_runtime  # noqa: E402
from kiln.kernels import choice  # noqa: E402
from kiln.runtime import generated, module_cache  # noqa: E402
from kiln.passes.partition import KernelGroup  # noqa: E402
from kiln.target import host_cpu  # noqa: E402

from conftest import max_err_ok, random_inputs, run_graph  # noqa: E402

F32, BF16, I32, I64, BOOL = DType.FLOAT32, DType.BFLOAT16, DType.INT32, DType.INT64, DType.BOOL


def whole_graph_group(graph) -> KernelGroup:
    """The whole graph as one kernel group (what the partitioner would give a fused chain)."""
    return KernelGroup(0, "reduction", list(graph.nodes), list(graph.inputs) + list(graph.constants),
                       list(graph.outputs))


def check_generated(graph, threads=1, config=None, inputs=None):
    group = whole_graph_group(graph)
    assert tvm_codegen.unsupported_reason(group) is None, tvm_codegen.unsupported_reason(group)
    config = config or schedule_group.tune_space.default()
    fn = module_cache.build_in_memory(group, config, host_cpu(), threads)
    kernel = tvm_runtime.GeneratedKernel(fn, group, "test", config, True, threads=threads)
    inputs = inputs if inputs is not None else random_inputs(graph)
    expected = run_graph(graph, inputs)
    got = kernel(list(inputs) + [graph.constants[v] for v in graph.constants])
    got = got if isinstance(got, tuple) else (got,)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, (g.shape, g.dtype, e.shape, e.dtype)
        if e.is_floating_point():
            assert torch.equal(torch.isnan(g), torch.isnan(e))
            rel = 1e-4 if e.dtype == torch.float32 else 2e-2
            ok, err, tol = max_err_ok(g.nan_to_num(0), e.nan_to_num(0), rel)
            assert ok, f"max abs error {err:.3g} > {tol:.3g}"
        else:
            assert torch.equal(g, e)
        if e.dim() == 4 and graph.outputs[0].type.layout.kind is LayoutKind.CHANNELS_LAST:
            assert g.is_contiguous(memory_format=torch.channels_last)


def one_op(op, shapes, attrs=None, dtype=F32, dtypes=None):
    b = GraphBuilder(op.value)
    xs = [b.input(f"x{i}", s, (dtypes or [dtype] * len(shapes))[i]) for i, s in enumerate(shapes)]
    return b.build([b.add(op, *xs, attrs=attrs)])


UNARY = [OpKind.NEG, OpKind.ABS, OpKind.EXP, OpKind.LOG, OpKind.SQRT, OpKind.RSQRT, OpKind.RECIPROCAL,
         OpKind.RELU, OpKind.SIGMOID, OpKind.TANH, OpKind.ERF, OpKind.SILU, OpKind.SIN, OpKind.COS,
         OpKind.FLOOR, OpKind.CEIL, OpKind.SIGN, OpKind.IDENTITY, OpKind.ISNAN, OpKind.ACOS, OpKind.ASIN,
         OpKind.ATAN, OpKind.ACOSH, OpKind.ASINH, OpKind.ATANH, OpKind.ROUND]
BINARY = [OpKind.ADD, OpKind.SUB, OpKind.MUL, OpKind.DIV, OpKind.POW, OpKind.MAXIMUM, OpKind.MINIMUM, OpKind.ATAN2,
          OpKind.EQ, OpKind.NE, OpKind.LT, OpKind.LE, OpKind.GT, OpKind.GE]

CASES = (
    [(f"{o.value}", lambda o=o: one_op(o, [(4, 33)])) for o in UNARY]
    + [(f"{o.value}-bcast", lambda o=o: one_op(o, [(4, 1, 24), (3, 24)])) for o in BINARY]
    + [
        ("gelu", lambda: one_op(OpKind.GELU, [(5, 40)], A.GeluAttrs())),
        ("gelu-tanh", lambda: one_op(OpKind.GELU, [(5, 40)], A.GeluAttrs(A.GeluApprox.TANH))),
        ("leaky_relu", lambda: one_op(OpKind.LEAKY_RELU, [(5, 40)], A.LeakyReluAttrs(0.2))),
        ("clamp", lambda: one_op(OpKind.CLAMP, [(5, 40)], A.ClampAttrs(-0.5, 0.7))),
        ("clamp-int", lambda: one_op(OpKind.CLAMP, [(5, 40)], A.ClampAttrs(1, 2), I32)),
        ("div-floor", lambda: one_op(OpKind.DIV, [(6, 8), (8,)], A.DivAttrs(A.Rounding.FLOOR))),
        ("div-trunc", lambda: one_op(OpKind.DIV, [(6, 8), (8,)], A.DivAttrs(A.Rounding.TRUNC))),
        ("add-int32", lambda: one_op(OpKind.ADD, [(6, 8), (6, 8)], dtype=I32)),
        ("mul-int64-f32", lambda: one_op(OpKind.MUL, [(6, 8), (6, 8)], dtypes=[I64, F32])),
        ("lt-int", lambda: one_op(OpKind.LT, [(6, 8), (8,)], dtype=I64)),
        ("and", lambda: one_op(OpKind.AND, [(6, 8), (6, 8)], dtype=BOOL)),
        ("or", lambda: one_op(OpKind.OR, [(6, 8), (6, 8)], dtype=BOOL)),
        ("not", lambda: one_op(OpKind.NOT, [(6, 8)], dtype=BOOL)),
        ("where", lambda: one_op(OpKind.WHERE, [(6, 8), (6, 8), (8,)], dtypes=[BOOL, F32, F32])),
        ("cast-f32-bf16", lambda: one_op(OpKind.CAST, [(6, 8)], A.CastAttrs(BF16))),
        ("cast-f32-i32", lambda: one_op(OpKind.CAST, [(6, 8)], A.CastAttrs(I32))),
        ("cast-i64-f32", lambda: one_op(OpKind.CAST, [(6, 8)], A.CastAttrs(F32), I64)),
        ("cast-f32-bool", lambda: one_op(OpKind.CAST, [(6, 8)], A.CastAttrs(BOOL))),
        ("add-bf16", lambda: one_op(OpKind.ADD, [(6, 40), (40,)], dtype=BF16)),
        ("gelu-bf16", lambda: one_op(OpKind.GELU, [(6, 40)], A.GeluAttrs(), BF16)),
        ("reshape", lambda: one_op(OpKind.RESHAPE, [(4, 6, 5)], A.ShapeAttrs((6, 20)))),
        ("permute", lambda: one_op(OpKind.PERMUTE, [(2, 3, 4, 5)], A.PermuteAttrs((0, 2, 1, 3)))),
        ("expand", lambda: one_op(OpKind.EXPAND, [(3, 1, 5)], A.ShapeAttrs((2, 3, 4, 5)))),
        ("slice", lambda: one_op(OpKind.SLICE, [(4, 17)], A.SliceAttrs(1, 2, 15, 3))),
        ("concat", lambda: one_op(OpKind.CONCAT, [(2, 3, 5), (2, 4, 5), (2, 1, 5)], A.AxisAttrs(1))),
        ("pad", lambda: one_op(OpKind.PAD, [(2, 3, 5)], A.PadAttrs((0, 0, 1, 2, 3, 0), value=1.5))),
        ("to_layout-nhwc", lambda: one_op(OpKind.TO_LAYOUT, [(2, 8, 5, 3)],
                                          A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST)))),
        ("sum", lambda: one_op(OpKind.SUM, [(4, 6, 7)], A.ReduceAttrs((1,), False))),
        ("mean-keepdim", lambda: one_op(OpKind.MEAN, [(2, 8, 5, 5)], A.ReduceAttrs((2, 3), True))),
        ("max", lambda: one_op(OpKind.MAX, [(4, 6, 7)], A.ReduceAttrs((0, 2), False))),
        ("min", lambda: one_op(OpKind.MIN, [(4, 6, 7)], A.ReduceAttrs((2,), True))),
        # column reductions (the innermost axis kept): reduction loops outside it
        ("sum-columns-nhwc", lambda: one_op(OpKind.SUM, [(2, 6, 5, 48)], A.ReduceAttrs((1, 2), True))),
        ("mean-columns", lambda: one_op(OpKind.MEAN, [(7, 5, 40)], A.ReduceAttrs((0, 1), False))),
        ("max-columns", lambda: one_op(OpKind.MAX, [(3, 9, 33)], A.ReduceAttrs((1,), True))),
        ("sum-columns-bf16", lambda: one_op(OpKind.SUM, [(1, 6, 6, 32)], A.ReduceAttrs((1, 2), True), BF16)),
        ("softmax", lambda: one_op(OpKind.SOFTMAX, [(3, 5, 64)], A.AxisAttrs(2))),
        ("softmax-axis1", lambda: one_op(OpKind.SOFTMAX, [(3, 5, 64)], A.AxisAttrs(1))),
        ("log_softmax", lambda: one_op(OpKind.LOG_SOFTMAX, [(3, 64)], A.AxisAttrs(1))),
        ("softmax-bf16", lambda: one_op(OpKind.SOFTMAX, [(3, 64)], A.AxisAttrs(1), BF16)),
        ("layer_norm", lambda: _layer_norm(F32)),
        ("layer_norm-bf16", lambda: _layer_norm(BF16)),
        ("batch_norm", lambda: _batch_norm()),
        ("chain-3op", lambda: _chain()),
        ("two-outputs", lambda: _two_outputs()),
        ("nhwc-in-residual-relu", lambda: _nhwc_chain()),
    ]
)


def _layer_norm(dt):
    b = GraphBuilder("ln")
    x = b.input("x", (4, 7, 96), dt)
    w, bias = b.const(torch.randn(96).to(dt.to_torch())), b.const(torch.randn(96).to(dt.to_torch()))
    return b.build([b.add(OpKind.LAYER_NORM, x, w, bias, attrs=A.LayerNormAttrs(1, 1e-5))])


def _batch_norm():
    b = GraphBuilder("bn")
    x = b.input("x", (2, 6, 5, 5))
    stats = [b.const(t) for t in (torch.randn(6), torch.rand(6) + 0.5, torch.randn(6), torch.randn(6))]
    return b.build([b.add(OpKind.BATCH_NORM, x, *stats, attrs=A.BatchNormAttrs(1e-5))])


def _chain():
    b = GraphBuilder("chain")
    x, y = b.input("x", (8, 1000)), b.input("y", (1000,))
    return b.build([b.add(OpKind.RELU, b.add(OpKind.ADD, b.add(OpKind.MUL, x, y), b.const(torch.tensor(1.0))))])


def _two_outputs(rows=8):
    b = GraphBuilder("two")
    x = b.input("x", (rows, 128))
    s = b.add(OpKind.ADD, x, x)
    return b.build([s, b.add(OpKind.SOFTMAX, b.add(OpKind.TANH, s), attrs=A.AxisAttrs(1))])


def _nhwc_chain():
    b = GraphBuilder("nhwc")
    x = b.input("x", (2, 16, 6, 6))
    cl = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST)))
    y = b.add(OpKind.RELU, b.add(OpKind.ADD, cl, b.const(torch.randn(16, 1, 1))))
    return b.build([b.add(OpKind.TO_LAYOUT, y, attrs=A.LayoutAttrs(Layout(LayoutKind.ROW_MAJOR)))])


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_generated_kernel_matches_reference(name, make):
    check_generated(make())


def _scheduled_script(group, config, threads) -> str:
    import tvm
    import tvm.s_tir as s_tir
    from tvm import te

    placeholders, outs = tvm_codegen.render(group)
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(placeholders + outs)}))
    schedule_group(sch, [t.op.name for t in outs] + tvm_expr_size.kept_stages(outs), config, threads)
    return sch.mod.script()


@pytest.mark.parametrize("config", list(schedule_group.tune_space)[::12])
def test_every_schedule_config_is_correct_with_parallel_loops(config):
    graph = _two_outputs(rows=2048)  # 256K elements: past two tasks of every grain but the largest
    if config["grain"] * 2 <= 2048 * 128:
        assert "T.parallel" in _scheduled_script(whole_graph_group(graph), config, 2)
    check_generated(graph, threads=2, config=config)


def test_small_groups_get_no_parallel_loop():
    # a TVM parallel launch costs about what 64K elements of work do: below two tasks of
    # the grain, the loops stay serial even on several threads
    config = schedule_group.tune_space.default()
    assert "T.parallel" not in _scheduled_script(whole_graph_group(_two_outputs(rows=8)), config, 2)
    assert "T.parallel" in _scheduled_script(whole_graph_group(_two_outputs(rows=2048)), config, 2)
    assert "T.parallel" not in _scheduled_script(whole_graph_group(_two_outputs(rows=2048)), config, 1)


def _grn_norm(rows=56, channels=384):
    """ConvNeXt V2's GRN statistic: the L2 norm of a channels-last image over H and W."""
    b = GraphBuilder("grn")
    x = b.input("x", (1, rows, rows, channels))
    s = b.add(OpKind.SUM, b.add(OpKind.MUL, x, x), attrs=A.ReduceAttrs((1, 2), True))
    return b.build([b.add(OpKind.SQRT, s)])


@pytest.mark.parametrize("threads", [1, 2])
def test_column_reductions_loop_over_the_reduced_axes_outside_the_kept_one(threads):
    # summing over H and W with C innermost: the row schedule walks each channel down a
    # stride of C elements; the column schedule reads contiguous runs of C, reduction loops
    # outside (their init in a block of its own)
    graph = _grn_norm()
    script = _scheduled_script(whole_graph_group(graph), schedule_group.tune_space.default(), threads)
    assert "_init" in script and "_rf" not in script
    assert ("T.parallel" in script) == (threads > 1)
    check_generated(graph, threads=threads)
    check_generated(_grn_norm(rows=7, channels=40), threads=threads)  # too small for parallel tasks


def _short_rows_layer_norm(permuted: bool):
    """PatchTSMixer's norm: rows of 8 features, [1, 7 channels, 63 patches, 8], its result
    permuted to [1, 7, 8, 63] when ``permuted``."""
    b = GraphBuilder("ln_short")
    x = b.input("x", (1, 7, 63, 8))
    y = b.add(OpKind.LAYER_NORM, x, b.const(torch.randn(8)), b.const(torch.randn(8)),
              attrs=A.LayerNormAttrs(1, 1e-5))
    return b.build([b.add(OpKind.PERMUTE, y, attrs=A.PermuteAttrs((0, 1, 3, 2))) if permuted else y])


@pytest.mark.parametrize("permuted", [False, True])
def test_layer_norm_takes_one_square_root_per_row_and_short_rows_stay_unfused(permuted):
    # the inverse standard deviation is a stage of one value per row, kept, rather than
    # recomputed for every element; an elementwise nest of no whole vectors (rows of 63
    # after the permute) keeps its loops, so its indices are loop counters, not divisions
    graph = _short_rows_layer_norm(permuted)
    script = _scheduled_script(whole_graph_group(graph), schedule_group.tune_space.default(), 1)
    assert script.count("T.rsqrt(") == 1 and "kept_inv_std" in script
    assert ("T.grid(1, 7, 8, 63)" in script) == permuted
    x = torch.randn(1, 7, 63, 8)
    x[0, 3, 5] *= 1e30  # its squared deviations overflow: NaN in that row, as torch gives
    check_generated(graph, inputs=[x])
    check_generated(graph)


@pytest.mark.parametrize("row", [37, 128, 8])
def test_softmax_rows_the_row_sum_cannot_vectorize_compute_each_exponential_once(row):
    # a row whose length is not a multiple of the row sum's vector lanes (ViT's 197 tokens)
    # is summed by a scalar loop: the exponentials go into a kept stage (one vectorizable
    # nest) that the sum and the output both read, rather than being computed in each
    b = GraphBuilder("softmax")
    x = b.input("x", (2, 3, 5, row))
    graph = b.build([b.add(OpKind.SOFTMAX, x, attrs=A.AxisAttrs(3))])
    script = _scheduled_script(whole_graph_group(graph), schedule_group.tune_space.default(), 1)
    assert ("kept_exp" in script) == (row == 37)
    x = torch.randn(2, 3, 5, row) * 10
    x[0, 0, 0, :3] = float("-inf")  # masked positions
    x[0, 0, 1] = float("-inf")  # a row masked whole: NaN, as torch gives
    check_generated(graph, inputs=[x])


def _group_norm_nhwc(batch, channels, size, groups):
    """A group norm + ReLU kernel group as the bf16 channels-last pipeline makes it: a bf16
    NHWC image cast, viewed NCHW as (N, G, C/G*H*W), layer-normed per group, back to NHWC.
    Returns (graph, group): the group starts at the cast (its input is the NHWC value)."""
    import dataclasses

    from kiln.ir import Node, Value

    cl, row = Layout(LayoutKind.CHANNELS_LAST), Layout()
    b = GraphBuilder("gn")
    x = b.input("x", (batch, channels, size, size), BF16)
    y = b.add(OpKind.CAST, b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(cl)), attrs=A.CastAttrs(F32))
    y = b.add(OpKind.RESHAPE, b.add(OpKind.TO_LAYOUT, y, attrs=A.LayoutAttrs(row)),
              attrs=A.ShapeAttrs((batch, groups, channels // groups * size * size)))
    y = b.add(OpKind.LAYER_NORM, y, attrs=A.LayerNormAttrs(1, 1e-5))
    y = b.add(OpKind.RESHAPE, y, attrs=A.ShapeAttrs((batch, channels, size, size)))
    y = b.add(OpKind.RELU, b.add(OpKind.TO_LAYOUT, y, attrs=A.LayoutAttrs(cl)))
    graph = b.build([b.add(OpKind.CAST, y, attrs=A.CastAttrs(BF16))])
    # the builder stores every result row-major; the cast, ReLU and last cast keep NHWC
    new, nodes = {}, []
    for i, n in enumerate(graph.nodes):
        ins = tuple(new.get(v, v) for v in n.inputs)
        outs = n.outputs
        if n.op in (OpKind.CAST, OpKind.RELU):
            outs = tuple(Value(dataclasses.replace(o.type, layout=cl), o.name) for o in outs)
            new.update(zip(n.outputs, outs))
        nodes.append(Node(n.op, ins, n.attrs, outs, n.scope))
    graph = graph.replace(nodes=tuple(nodes), outputs=tuple(new.get(v, v) for v in graph.outputs))
    body = list(graph.nodes[1:])
    return graph, KernelGroup(0, "reduction", body, [body[0].inputs[0]], list(graph.outputs))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("groups", [32, 1])
def test_group_norm_over_channels_last_reads_in_storage_order(groups, threads):
    # each group's elements in NCHW order (c * H * W + hw) are strided in NHWC storage: the
    # reduction loop is split at H * W and the pixel loop put outside the channel loop (and,
    # with several groups, outside the group loop), so each step reads a contiguous run
    graph, group = _group_norm_nhwc(2, 64, 32, groups)  # two rows of 64K: parallel tasks on 2 threads
    config = schedule_group.tune_space.default()
    script = _scheduled_script(group, config, threads)
    assert ("_init" in script) == (groups > 1)  # the group loop moved inside the reduction
    assert ("_rf" in script) == (groups == 1)  # one sum per row: vector lanes of partial sums
    assert ("T.parallel" in script) == (threads > 1)
    fn = module_cache.build_in_memory(group, config, host_cpu(), threads)
    kernel = tvm_runtime.GeneratedKernel(fn, group, "test", config, True, threads=threads)
    x = torch.randn(2, 64, 32, 32).to(torch.bfloat16)
    got = kernel([x.contiguous(memory_format=torch.channels_last)])
    want = torch.relu(torch.nn.functional.group_norm(x.float(), groups, eps=1e-5)).to(torch.bfloat16)
    assert got.is_contiguous(memory_format=torch.channels_last)
    ok, err, tol = max_err_ok(got.float(), want.float(), 2e-2)
    assert ok, f"max abs error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("op,attrs", [(OpKind.GELU, A.GeluAttrs()), (OpKind.SILU, None), (OpKind.TANH, None)])
def test_bf16_groups_render_vectorizable_math_inline(op, attrs):
    # a bf16 group (SegFormer's GELU after its depthwise conv) takes tvm_math's forms with
    # the operand written out, not TVM's scalar libm calls (one call per vector lane)
    graph = one_op(op, [(8, 256)], attrs, BF16)
    script = _scheduled_script(whole_graph_group(graph), schedule_group.tune_space.default(), 1)
    assert "T.erf(" not in script and "T.exp(" not in script and "T.tanh(" not in script
    assert "T.Let(" not in script and "T.vectorized" in script
    x = torch.linspace(-12, 12, 8 * 256).reshape(8, 256).to(torch.bfloat16)
    x[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    check_generated(graph, inputs=[x])


def test_nested_math_in_bf16_groups_keeps_tvms_functions():
    # two forms deep with 16-bit floats: inline forms would multiply their operand's copies
    b = GraphBuilder("nested")
    x = b.input("x", (4, 64), BF16)
    graph = b.build([b.add(OpKind.TANH, b.add(OpKind.SIGMOID, x))])
    script = _scheduled_script(whole_graph_group(graph), schedule_group.tune_space.default(), 1)
    assert "T.tanh(" in script
    check_generated(graph)


def _select_chain(links: int, dtype=F32):
    """x -> sigmoid -> softmax -> ``links`` times (clamp, leaky_relu, maximum with x, relu):
    every link's form reads its operand more than once."""
    b = GraphBuilder("selects")
    x = b.input("x", (4, 32), dtype)
    v = b.add(OpKind.SOFTMAX, b.add(OpKind.SIGMOID, x), attrs=A.AxisAttrs(1))
    for _ in range(links):
        v = b.add(OpKind.CLAMP, v, attrs=A.ClampAttrs(0.01, 0.5))
        v = b.add(OpKind.LEAKY_RELU, v, attrs=A.LeakyReluAttrs(0.1))
        v = b.add(OpKind.RELU, b.add(OpKind.MAXIMUM, v, x))
    return b.build([v])


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_values_whose_expressions_grow_past_the_bound_are_stored_once(dtype):
    # each link's forms read their operand more than once and nest selects: written out, the
    # expression doubles per link, and TVM's passes slow down faster still (a fuzzed chain like
    # it dominated the fuzzer's time). Where a node would pass the bounds its operands are stored
    # to stages of their own, so every stage stays within them, and the kernel still computes
    # the chain
    group = whole_graph_group(_select_chain(3, dtype))
    kept = tvm_expr_size.kept_stages(tvm_codegen.render(group)[1])
    assert kept
    for stage in tvm_expr_size.stages(tvm_codegen.render(group)[1]):
        for body in getattr(stage.op, "body", []):
            assert tvm_expr_size.select_depth(body) <= tvm_expr_size.MAX_SELECT_DEPTH
            assert tvm_expr_size.expression_nodes(body, 10 ** 6) <= tvm_expr_size.MAX_EXPRESSION_NODES
    x = (torch.randn(4, 32) * 4).to(dtype.to_torch())
    x[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    check_generated(_select_chain(3, dtype), inputs=[x])


def test_groups_of_the_usual_size_store_nothing_extra():
    group = whole_graph_group(_select_chain(0))
    assert tvm_expr_size.kept_stages(tvm_codegen.render(group)[1]) == []


def test_unsupported_groups_are_declined():
    b = GraphBuilder("argmax")
    x = b.input("x", (4, 5))
    g = whole_graph_group(b.build([b.add(OpKind.ARGMAX, x, attrs=A.ArgReduceAttrs(1, False))]))
    assert "argmax" in tvm_codegen.unsupported_reason(g)
    b = GraphBuilder("dyn")  # a named symbolic size is a variable of the kernel; an expression of them is not
    x = b.input("x", (Sym("2*batch"), 5))
    assert "size expression" in tvm_codegen.unsupported_reason(whole_graph_group(b.build([b.add(OpKind.RELU, x)])))


def test_tuning_round_trip_through_the_database(tmp_path):
    graph = _chain()
    group = whole_graph_group(graph)
    db = TuningDB(str(tmp_path / "tuning.sqlite"))
    first = generated.generated_kernel(group, graph, host_cpu(), 1, Budget(3, 60.0), db=db)
    assert first.tuning.trials == 3 and not first.tuning.from_db and len(db) == 1
    assert first.config in list(schedule_group.tune_space)
    again = generated.generated_kernel(group, graph, host_cpu(), 1, Budget(3, 60.0), db=db)
    assert again.tuning.from_db and again.tuning.trials == 0 and again.config == first.config
    assert not again.built  # the winner's module comes from the compile cache
    x = random_inputs(graph)
    const = [graph.constants[v] for v in graph.constants]
    torch.testing.assert_close(again(x + const), run_graph(graph, x)[0])


@pytest.fixture
def fake_timer(monkeypatch, tmp_path):
    """The group choice's clock, faked: the per-node kernels take ``node_s`` and a generated
    kernel ``generated_s`` (each function still runs once, so failures show), and the
    decisions it memoizes start empty and are dropped after the test. A tuning database of
    the test's own (``tuning_db(name)``: a fresh one per name, since a recorded decision is
    reused without timing)."""
    class Times:
        node_s = 1.0
        generated_s = 0.5

    def best_seconds(fns, rounds, warmup=0):
        for fn in fns:
            fn()
        # choose_group times [per-node] alone first
        return [Times.node_s]

    def samples(fns, rounds, settled=None):
        for fn in fns:
            fn()
        # then [generated, per-node] together, in rounds
        return [[Times.generated_s], [Times.node_s]]

    def tuning_db(name: str):
        monkeypatch.setenv("KILN_TUNING_DB", str(tmp_path / f"{name}.sqlite"))

    Times.tuning_db = staticmethod(tuning_db)
    tuning_db("first")

    monkeypatch.setattr(choice, "_GROUP_MEMO", {})
    monkeypatch.setattr(choice, "best_seconds", best_seconds)
    monkeypatch.setattr(choice, "samples", samples)
    return Times


def _reference_fns(graph):
    from kiln.kernels.registry import select_kernel

    return [select_kernel(n, "reference").fn for n in graph.nodes]


def test_a_generated_kernel_that_disagrees_never_wins(fake_timer):
    graph = _chain()
    group = whole_graph_group(graph)
    good = generated.generated_kernel(group, graph, host_cpu(), 1, "none")

    class Wrong(tvm_runtime.GeneratedKernel):
        def __call__(self, ins, attrs=None):
            return super().__call__(ins, attrs) + 1e-2

    wrong = Wrong(good.func, group, "wrong", good.config, False)
    # the per-node kernels take longer than the generated one: the agreeing kernel wins,
    # so only the numbers can disqualify the other
    nodes = _reference_fns(graph)
    assert choice.choose_group(group, graph, lambda g: good, nodes, 1) is good
    choice._GROUP_MEMO.clear()
    assert choice.choose_group(group, graph, lambda g: wrong, nodes, 1) is None
    # and a generated kernel that is slower than the per-node kernels loses too
    choice._GROUP_MEMO.clear()
    fake_timer.tuning_db("slower")
    fake_timer.generated_s = 2 * fake_timer.node_s
    assert choice.choose_group(group, graph, lambda g: good, nodes, 1) is None


class SmallModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(64)
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x, y):
        h = self.ln(x * y + 1.0)
        # groups: [mul, add, layer_norm], [linear | mul, tanh], [softmax, mul, sub, add]
        return torch.softmax(self.fc(h), -1) * 2.0 - h + torch.tanh(self.fc(h) * 0.5)


def test_model_end_to_end_with_generated_kernels(monkeypatch):
    import kiln

    monkeypatch.setenv("KILN_GROUP_CHOICE", "generated")  # agreeing generated kernels win
    m = SmallModel().eval()
    x, y = torch.randn(4, 16, 64), torch.randn(64)
    c = kiln.compile(m, (x, y))
    with torch.no_grad():
        ok, err, tol = max_err_ok(c(x, y), m(x, y))
    assert ok, f"max abs error {err:.3g} > {tol:.3g}"
    steps = c.compiled[0].plan.steps
    generated_steps = [s for s in steps if isinstance(s.fn, tvm_runtime.GeneratedKernel)]
    assert len(generated_steps) >= 2
    # the GEMM keeps its library kernel; its injective consumers run as one generated kernel
    assert any(a.node.op is OpKind.LINEAR and isinstance(b.fn, tvm_runtime.GeneratedKernel)
               for a, b in zip(steps, steps[1:]))


_COMPILE_IN_NEW_PROCESS = """
import json, sys, torch
from kiln.ir import GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.driver import compile_graph
from kiln.options import CompileOptions
from kiln.runtime.plan import build_plan
from kiln.codegen.tvm_runtime import GeneratedKernel
torch.manual_seed(0)
b = GraphBuilder("g")
x, y = b.input("x", (32, 256)), b.input("y", (256,))
h = b.add(OpKind.TANH, b.add(OpKind.MUL, x, y))
out = b.add(OpKind.LAYER_NORM, h, b.const(torch.randn(256)), b.const(torch.randn(256)), attrs=A.LayerNormAttrs())
graph = b.build([out])
compiled = compile_graph(graph, CompileOptions.parse(tune="none"))
plan = compiled.plan
xs = [torch.randn(32, 256), torch.randn(256)]
with torch.no_grad():
    err = float((plan.run(xs)[0] - build_plan(graph, "reference").run(xs)[0]).abs().max())
ok = err <= 1e-4
steps = [s for s in plan.steps if isinstance(s.fn, GeneratedKernel)]
print(json.dumps({"ok": ok, "err": err, "hit": compiled.report.compile_cache_hit, "generated": len(steps),
                  "built": sum(s.fn.built for s in steps), "tvm_imported": "tvm" in sys.modules}))
"""


def _compile_in_new_process(cache_dir):
    env = dict(os.environ, KILN_CACHE_DIR=str(cache_dir), KILN_GROUP_CHOICE="generated")
    out = subprocess.run([sys.executable, "-c", _COMPILE_IN_NEW_PROCESS], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compiled_module_cache_hit_in_new_process(tmp_path):
    cold = _compile_in_new_process(tmp_path)
    assert cold["ok"] and not cold["hit"] and cold["generated"] == 1 and cold["built"] == 1, cold
    warm = _compile_in_new_process(tmp_path)
    assert warm["ok"] and warm["hit"] and warm["generated"] == 1, warm
    assert warm["built"] == 0 and not warm["tvm_imported"], warm  # loaded from the cache: no code generation


def test_groups_too_cheap_to_gain_from_a_kernel_are_not_generated(fake_timer):
    graph = one_op(OpKind.RELU, [(4, 8)])
    group = whole_graph_group(graph)

    def must_not_generate(g):
        raise AssertionError("generated a kernel for a group that cannot gain from one")

    fake_timer.node_s = choice.WORTH_GENERATING_S / 2
    assert choice.choose_group(group, graph, must_not_generate, _reference_fns(graph), 1) is None
    # the same group with per-node kernels above the threshold is worth trying to generate
    choice._GROUP_MEMO.clear()
    fake_timer.node_s = choice.WORTH_GENERATING_S * 2
    asked = []
    assert choice.choose_group(group, graph, lambda g: asked.append(g), _reference_fns(graph), 1) is None
    assert asked == [group]


def test_a_recorded_group_decision_is_reused_without_generating_or_timing(fake_timer):
    graph = _chain()
    group = whole_graph_group(graph)
    good = generated.generated_kernel(group, graph, host_cpu(), 1, "none")
    nodes = _reference_fns(graph)
    fake_timer.generated_s = 2 * fake_timer.node_s  # the per-node kernels win, recorded
    assert choice.choose_group(group, graph, lambda g: good, nodes, 1) is None
    choice._GROUP_MEMO.clear()  # a fresh process: the database's record decides

    def must_not_generate(g):
        raise AssertionError("generated a kernel the tuning database recorded losing")

    assert choice.choose_group(group, graph, must_not_generate, nodes, 1) is None
    # a recorded win for the generated kernel: generated and checked, not timed again
    fake_timer.tuning_db("generated-won")
    choice._GROUP_MEMO.clear()
    fake_timer.generated_s = fake_timer.node_s / 2
    assert choice.choose_group(group, graph, lambda g: good, nodes, 1) is good
    choice._GROUP_MEMO.clear()
    fake_timer.generated_s = 2 * fake_timer.node_s
    assert choice.choose_group(group, graph, lambda g: good, nodes, 1) is good
    with choice.remeasuring():  # kiln tune: timed afresh
        assert choice.choose_group(group, graph, lambda g: good, nodes, 1) is None


def test_groups_whose_nodes_only_make_views_are_not_generated(fake_timer):
    # the forecasters' head input, y[:, -1] flattened: a slice and a reshape, both views
    b = GraphBuilder("last_step")
    y = b.input("y", (4, 6, 8))
    last = b.add(OpKind.SLICE, y, attrs=A.SliceAttrs(1, 5, 6))
    graph = b.build([b.add(OpKind.RESHAPE, last, attrs=A.ShapeAttrs((4, 8)))])
    group = whole_graph_group(graph)

    def must_not_generate(g):
        raise AssertionError("generated a kernel for a group of views")

    # per-node kernels slow enough to be worth replacing (the fake timer's node_s): only
    # their being views declines
    views = [lambda ins, a: ins[0][:, 5:6], lambda ins, a: ins[0].reshape(4, 8)]
    assert choice.choose_group(group, graph, must_not_generate, views, 1) is None


def test_groups_of_view_ops_are_not_generated_even_where_they_copy(fake_timer):
    # BERT's head merge: permute + reshape copies on a contiguous input (what the choice
    # would time) but is a view of sdpa's [B,S,H,D]-strided output (what the plan passes)
    b = GraphBuilder("merge_heads")
    o = b.input("o", (1, 4, 8, 16))
    p = b.add(OpKind.PERMUTE, o, attrs=A.PermuteAttrs((0, 2, 1, 3)))
    graph = b.build([b.add(OpKind.RESHAPE, p, attrs=A.ShapeAttrs((1, 8, 64)))])
    group = whole_graph_group(graph)

    def must_not_generate(g):
        raise AssertionError("generated a kernel for a group of view ops")

    copies = [lambda ins, a: ins[0].permute(0, 2, 1, 3), lambda ins, a: ins[0].reshape(1, 8, 64)]
    assert choice.choose_group(group, graph, must_not_generate, copies, 1) is None
    strided = torch.randn(1, 8, 4, 16).transpose(1, 2)  # sdpa's output layout
    merged = copies[1]([copies[0]([strided], None)], None)
    assert merged.untyped_storage().data_ptr() == strided.untyped_storage().data_ptr()


def test_inputs_at_unaligned_addresses_are_safe():
    # generated code uses aligned vector loads: views at an offset and numpy-owned memory
    # (16-byte aligned) must still give the right answer, not a crash
    graph = _chain()
    group = whole_graph_group(graph)
    kernel = generated.generated_kernel(group, graph, host_cpu(), 1, "none")
    base = torch.randn(8 * 1000 + 3)
    x = base[3:].view(8, 1000)
    y = torch.from_numpy(torch.randn(1001).numpy()[1:])
    assert x.data_ptr() % 64 and y.data_ptr() % 64
    assert kernel.plain  # static, plain layouts: the fast path, which hands these to the copying one
    const = [graph.constants[v] for v in graph.constants]
    torch.testing.assert_close(kernel([x, y] + const), run_graph(graph, [x, y])[0])
    xt = torch.randn(1000, 8).t()  # not contiguous
    torch.testing.assert_close(kernel([xt, y] + const), run_graph(graph, [xt, y])[0])


class _TailIntoNorm(torch.nn.Module):
    """linear -> (mul, add): an epilogue no GEMM kernel takes, feeding a LayerNorm."""

    def __init__(self, tail_used_elsewhere: bool):
        super().__init__()
        self.fc, self.ln, self.elsewhere = torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), tail_used_elsewhere

    def forward(self, x):
        t = self.fc(x) * 0.5 + x
        return (self.ln(t), t * 3.0) if self.elsewhere else self.ln(t)


@pytest.mark.parametrize("elsewhere", [False, True])
def test_gemm_tail_runs_in_the_normalization_kernel_it_feeds(monkeypatch, elsewhere):
    import kiln

    monkeypatch.setenv("KILN_GROUP_CHOICE", "generated")
    m = _TailIntoNorm(elsewhere).eval()
    x = torch.randn(8, 64)
    c = kiln.compile(m, (x,))
    with torch.no_grad():
        for got, ref in zip(*(o if isinstance(o, tuple) else (o,) for o in (c(x), m(x)))):
            ok, err, tol = max_err_ok(got, ref)
            assert ok, f"max abs error {err:.3g} > {tol:.3g}"
    plan = c.compiled[0].plan
    kernel_of = {n.op: k for n, k in zip(plan.graph.nodes, plan.node_kernels)}
    assert not kernel_of[OpKind.LINEAR].startswith(generated.KERNEL_PREFIX)  # the GEMM keeps its library kernel
    tail_with_norm = kernel_of[OpKind.MUL] == kernel_of[OpKind.LAYER_NORM]
    assert kernel_of[OpKind.LAYER_NORM].startswith(generated.KERNEL_PREFIX)
    # merged only when the normalization is the tail's sole reader
    assert tail_with_norm is not elsewhere, (elsewhere, kernel_of)


def test_parallel_kernels_get_a_pool_of_their_thread_count_without_pinning(monkeypatch):
    # TVM alone sizes its pool to half the cores on x86 (one thread on a 2-core machine) and
    # pins threads, the caller included, to cores
    monkeypatch.setattr(tvm_runtime, "_USER_POOL", False)
    monkeypatch.setattr(tvm_runtime, "_pool_threads", None)
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # restored after the test; Kiln sets its own
    affinity = os.sched_getaffinity(0)
    check_generated(_two_outputs(rows=2048), threads=2)
    import tvm_ffi

    assert tvm_ffi.get_global_func("runtime.NumThreads")() == 2
    assert os.sched_getaffinity(0) == affinity


@pytest.mark.parametrize("tvm_pool", [False, True])
def test_loaded_parallel_kernels_run_on_torch_openmp_workers(monkeypatch, tmp_path, tvm_pool):
    # TVM's own pool would share the cores with torch's OpenMP workers, which spin after each
    # torch op; an exported module's parallel loops go through kiln._C's OpenMP launcher
    # instead (KILN_TVM_THREAD_POOL=1 keeps TVM's pool)
    from kiln import _C

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KILN_TVM_THREAD_POOL", "1" if tvm_pool else "0")
    graph = _two_outputs(rows=4096)  # 512K elements: parallel loops at 2 threads
    group = whole_graph_group(graph)
    config = schedule_group.tune_space.default()
    fn, built = module_cache.compiled(group, config, host_cpu(), 2)
    kernel = tvm_runtime.GeneratedKernel(fn, group, "test", config, built, threads=2)
    assert kernel.tvm_pool is tvm_pool
    inputs = random_inputs(graph)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = _C.tvm_parallel_launches()
        got = kernel(list(inputs))
        launched = _C.tvm_parallel_launches() - before
    finally:
        torch.set_num_threads(threads)
    assert (launched > 0) is not tvm_pool  # a launch per parallel stage
    for g, e in zip(got, run_graph(graph, inputs)):
        ok, err, tol = max_err_ok(g, e, 1e-4)
        assert ok, f"max abs error {err:.3g} > {tol:.3g}"



def test_round_ties_go_to_even():
    # tirx.round rounds half away from zero; torch.round (and the renderer's nearbyint) half to even
    check_generated(one_op(OpKind.ROUND, [(2, 9)]), inputs=[torch.arange(-4.5, 4.5, 0.5).reshape(2, 9)])

"""Generated TensorIR kernels over symbolic sizes: one compiled kernel serves every value of
the named sizes (batch, seq), checked against the torch reference at odd sizes; groups the
renderer cannot make size-generic are declined with a reason."""
import pytest
import torch

pytest.importorskip("tvm")

from kiln.codegen import tvm as tvm_codegen  # noqa: E402
from kiln.codegen import tvm_runtime  # noqa: E402
from kiln.codegen.schedules_cpu import schedule_group  # noqa: E402
from kiln.ir import DType, GraphBuilder, OpKind, Sym  # noqa: E402
from kiln.ir import attrs as A  # noqa: E402
from kiln.kernels import choice  # noqa: E402
from kiln.passes.partition import KernelGroup  # noqa: E402
from kiln.runtime import module_cache  # noqa: E402
from kiln.target import host_cpu  # noqa: E402

from conftest import max_err_ok  # noqa: E402

B, S = Sym("batch"), Sym("seq")
SIZES = [(1, 1), (1, 7), (2, 129), (3, 16)]


def whole_graph_group(graph) -> KernelGroup:
    return KernelGroup(0, "reduction", list(graph.nodes), list(graph.inputs) + list(graph.constants),
                       list(graph.outputs))


def _residual_layer_norm():
    # BERT's add + LayerNorm after a GEMM: rows symbolic, the normalized axis static
    b = GraphBuilder("res_ln")
    x, r = b.input("x", (B, S, 96)), b.input("r", (B, S, 96))
    w, bias = b.const(torch.randn(96)), b.const(torch.randn(96))
    s = b.add(OpKind.ADD, b.add(OpKind.ADD, x, b.const(torch.randn(96))), r)
    return b.build([b.add(OpKind.LAYER_NORM, s, w, bias, attrs=A.LayerNormAttrs(1, 1e-12))])


def _gelu_bias():
    b = GraphBuilder("gelu")
    x = b.input("x", (B, S, 160))
    return b.build([b.add(OpKind.GELU, b.add(OpKind.ADD, x, b.const(torch.randn(160))), attrs=A.GeluAttrs())])


def _heads_split():
    # [b, s, 96] -> [b, s, 4, 24] -> [b, 4, s, 24], scaled: a reshape whose symbolic axes are kept
    b = GraphBuilder("heads")
    x = b.input("x", (B, S, 96))
    y = b.add(OpKind.RESHAPE, x, attrs=A.ShapeAttrs((B, S, 4, 24)))
    y = b.add(OpKind.PERMUTE, y, attrs=A.PermuteAttrs((0, 2, 1, 3)))
    return b.build([b.add(OpKind.MUL, y, b.const(torch.tensor(0.5)))])


def _softmax_rows_and_two_outputs():
    b = GraphBuilder("two")
    x = b.input("x", (B, S, 40))
    t = b.add(OpKind.TANH, x)
    return b.build([t, b.add(OpKind.SOFTMAX, t, attrs=A.AxisAttrs(2))])


CASES = {"residual-layer-norm": _residual_layer_norm, "gelu-bias": _gelu_bias, "heads-split": _heads_split,
         "softmax-two-outputs": _softmax_rows_and_two_outputs}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_one_symbolic_kernel_matches_the_reference_at_every_size(name, threads):
    graph = CASES[name]()
    group = whole_graph_group(graph)
    assert tvm_codegen.unsupported_reason(group) is None, tvm_codegen.unsupported_reason(group)
    config = schedule_group.tune_space.default()
    kernel = tvm_runtime.GeneratedKernel(module_cache.build_in_memory(group, config, host_cpu(), threads),
                                         group, "test", config, True, threads=threads)
    for batch, seq in SIZES:
        sizes = {"batch": batch, "seq": seq}
        ins = choice.group_inputs(group, graph, sizes)
        with torch.no_grad():
            want = choice.reference_outputs(group, ins, sizes)
        got = choice.as_output_list(kernel(ins))
        for g, e in zip(got, want):
            assert g.shape == e.shape and g.dtype == e.dtype, (name, sizes, g.shape, e.shape)
            ok, err, tol = max_err_ok(g, e, 1e-4)
            assert ok, f"{name} at {sizes}: max abs error {err:.3g} > {tol:.3g}"


def test_groups_that_need_a_symbolic_size_value_are_declined():
    def reason(make):
        b = GraphBuilder("g")
        return tvm_codegen.unsupported_reason(whole_graph_group(make(b)))

    # a reduction over a symbolic axis (its length is a count the kernel would need)
    assert "reduction over a symbolic size" in (tvm_codegen.unsupported_reason(whole_graph_group(_sum_over_seq()))
                                                or _render_reason(_sum_over_seq()))
    # a size that is an expression of names: no tensor dim binds it
    assert "size expression" in reason(lambda b: b.build([b.add(OpKind.RELU, b.input("x", (Sym("2*seq"), 5)))]))


def _sum_over_seq():
    b = GraphBuilder("sum")
    x = b.input("x", (B, S, 8))
    return b.build([b.add(OpKind.SUM, x, attrs=A.ReduceAttrs((1,), True))])


def _render_reason(graph) -> str:
    """Why rendering fails (the walk finds some shapes unsupported only while rendering)."""
    try:
        tvm_codegen.render(whole_graph_group(graph))
    except tvm_codegen.Unsupported as e:
        return str(e)
    return ""


def _channels_last_bias_relu():
    from kiln.ir import Layout, LayoutKind

    b = GraphBuilder("nhwc")
    x = b.input("x", (B, 16, 128, 128))
    cl = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST)))
    return b.build([b.add(OpKind.RELU, b.add(OpKind.ADD, cl, b.const(torch.randn(16, 1, 1))))])


@pytest.mark.parametrize("config", list(schedule_group.tune_space)[::36])
def test_symbolic_batch_over_large_images_splits_into_parallel_tasks(config):
    # a batch row of 256K elements: tasks of the grain within a row, so batch 1 runs on both
    # threads too (a row of less than two grains is one task)
    import tvm
    import tvm.s_tir as s_tir
    from tvm import te

    graph = _channels_last_bias_relu()
    group = whole_graph_group(graph)
    placeholders, outs = tvm_codegen.render(group)
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(placeholders + outs)}))
    schedule_group(sch, [t.op.name for t in outs], config, 2)
    script = sch.mod.script()
    assert "T.parallel" in script
    # split within the row: the parallel loop's extent grows with the batch times the tasks per row
    tasks = 16 * 128 * 128 // config["grain"]
    assert (f"T.parallel(batch * T.int64({tasks}))" in script) == (tasks >= 2)
    kernel = tvm_runtime.GeneratedKernel(module_cache.build_in_memory(group, config, host_cpu(), 2),
                                         group, "test", config, True, threads=2)
    for batch in (1, 3):
        ins = choice.group_inputs(group, graph, {"batch": batch})
        got, want = kernel(ins), choice.reference_outputs(group, ins, {"batch": batch})[0]
        assert got.shape == want.shape
        ok, err, tol = max_err_ok(got, want, 1e-4)
        assert ok, (batch, err, tol)


def test_symbolic_rows_run_in_parallel_only_when_the_call_brings_two_grains(monkeypatch, tmp_path):
    # the loop over symbolic rows is built parallel; the call decides: a few rows run on the
    # calling thread alone (no parallel region), many rows on torch's OpenMP workers
    from kiln import _C

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KILN_TVM_THREAD_POOL", "0")
    graph = _residual_layer_norm()
    group = whole_graph_group(graph)
    config = schedule_group.tune_space.default()
    fn, built = module_cache.compiled(group, config, host_cpu(), 2)
    kernel = tvm_runtime.GeneratedKernel(fn, group, "test", config, built, threads=2)
    assert kernel.serial_below == 2 * config["grain"]
    rows_for_two_grains = -(-kernel.serial_below // 96)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for batch, seq, serial in ((1, 7, True), (2, rows_for_two_grains // 2 + 1, False)):
            ins = choice.group_inputs(group, graph, {"batch": batch, "seq": seq})
            launches, serial_launches = _C.tvm_parallel_launches(), _C.tvm_serial_launches()
            got = kernel(ins)
            launched = _C.tvm_parallel_launches() - launches
            ran_serially = _C.tvm_serial_launches() - serial_launches
            assert launched > 0  # the loop is parallel in the kernel either way
            assert ran_serially == (launched if serial else 0), (batch, seq, launched, ran_serially)
            want = choice.reference_outputs(group, ins, {"batch": batch, "seq": seq})[0]
            ok, err, tol = max_err_ok(got, want, 1e-4)
            assert ok, (batch, seq, err, tol)
    finally:
        torch.set_num_threads(threads)


def test_a_kernel_on_tvms_own_pool_keeps_every_call_parallel(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KILN_TVM_THREAD_POOL", "1")
    group = whole_graph_group(_residual_layer_norm())
    config = schedule_group.tune_space.default()
    fn, built = module_cache.compiled(group, config, host_cpu(), 2)
    assert tvm_runtime.GeneratedKernel(fn, group, "test", config, built, threads=2).serial_below == 0
    one = tvm_runtime.GeneratedKernel(fn, group, "test", config, built, threads=1)
    assert one.serial_below == 0  # built for one thread: no parallel loop to decide about

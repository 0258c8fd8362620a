"""Kernel choice per size bucket (runtime/by_size.py): a dynamic plan's node measured at
several representative sizes runs, per call, the kernel chosen nearest to the call's size;
the choice is recorded so that a warm compile and a loaded artifact rebuild the same
dispatch. No timing here: kernel choice is replaced by a rule on the node's size."""
import pytest
import torch
from torch import nn

import kiln
import kiln.runtime.plan as plan_module
from kiln.ir import DType, Node, OpKind, TensorType, Value
from kiln.ir.types import Sym
from kiln.runtime.by_size import BySize, decode, dispatch, encode, member_kernels, representative_sizes, varied_size


# ----------------------------------------------------------------------------- sizes and records
def test_representative_sizes_add_a_quarter_and_with_three_buckets_four_times_the_example():
    assert representative_sizes({"batch": 25}, {}, 2) == [{"batch": 25}, {"batch": 6}]
    assert representative_sizes({"batch": 25}, {}, 1) == [{"batch": 25}]
    assert representative_sizes({"batch": 7}, {}, 2) == [{"batch": 7}]  # a quarter would be 1
    # the size with the largest example value varies; the others keep theirs
    assert representative_sizes({"batch": 1, "seq": 64}, {"seq": (1, 512)}, 3) == \
        [{"batch": 1, "seq": 64}, {"batch": 1, "seq": 16}, {"batch": 1, "seq": 256}]
    assert representative_sizes({"seq": 200}, {"seq": (1, 512)}, 3) == [{"seq": 200}, {"seq": 50}]  # 512 < 3x
    assert representative_sizes({"seq": 64}, {}, 3) == [{"seq": 64}, {"seq": 16}, {"seq": 256}]  # open range
    assert representative_sizes({"seq": 64}, {"seq": (20, None)}, 2) == [{"seq": 64}]  # 16 is below the range
    assert representative_sizes({}, {}, 3) == [{}]


def test_representative_sizes_vary_the_named_size_when_given():
    hints = {"batch": 25, "seq": 131}
    assert representative_sizes(hints, {}, 2, ("batch", 1)) == [hints, {"batch": 1, "seq": 131}]
    assert representative_sizes(hints, {}, 3, ("batch", 1)) == [hints, {"batch": 1, "seq": 131},
                                                                {"batch": 100, "seq": 131}]
    assert representative_sizes(hints, {"batch": (2, 64)}, 2, ("batch", 1)) == \
        [hints, {"batch": 2, "seq": 131}]  # the range's lower end
    # no room below the example's batch: the default (the largest size, at a quarter)
    assert representative_sizes({"batch": 2, "seq": 64}, {"batch": (2, None)}, 2, ("batch", 1)) == \
        [{"batch": 2, "seq": 64}, {"batch": 2, "seq": 16}]
    assert representative_sizes(hints, {}, 2, None) == [hints, {"batch": 25, "seq": 32}]  # the largest
    assert representative_sizes(hints, {}, 2, ("gone", 1)) == [hints, {"batch": 25, "seq": 32}]


def test_records_round_trip_and_malformed_ones_are_refused():
    entries = [({"batch": 6}, "cpu.a"), ({"batch": 25, "seq": 3}, "cpu.b")]
    text = encode(entries)
    assert text == "by-size[batch=6:cpu.a;batch=25,seq=3:cpu.b]"
    assert decode(text) == entries
    assert decode("cpu.onednn_conv") is None
    assert member_kernels(text) == ["cpu.a", "cpu.b"]
    assert member_kernels("cpu.x") == ["cpu.x"]
    for bad in ("by-size[batch=6:cpu.a]", "by-size[batch=6:cpu.a;batch=x:cpu.b]", "by-size[batch=6cpu.a;b=1:c]",
                "by-size[batch=6:cpu.a;batch=9:cpu.b"):
        with pytest.raises(ValueError):
            decode(bad)


def _linear_node():
    x = Value(TensorType(DType.FLOAT32, (Sym("batch"), 16)), "x")
    w = Value(TensorType(DType.FLOAT32, (8, 16)), "w")
    y = Value(TensorType(DType.FLOAT32, (Sym("batch"), 8)), "y")
    return Node(OpKind.LINEAR, (x, w, None), None, (y,))


def test_dispatch_calls_the_kernel_of_the_bucket_a_calls_size_falls_in():
    node = _linear_node()
    bound = []

    def bind(name, sizes):
        bound.append((name, sizes["batch"]))
        return lambda ins, attrs, name=name: name

    entries = [({"batch": 64}, "big"), ({"batch": 4}, "small"), ({"batch": 256}, "big")]
    recorded, fn = dispatch(node, entries, bind)
    assert isinstance(fn, BySize)
    assert recorded == "by-size[batch=4:small;batch=64:big;batch=256:big]"  # in order of size
    assert bound == [("small", 4), ("big", 64)]  # each kernel prepared once, at its smallest size
    assert fn.bounds == (16, 128)  # geometric means of neighbouring sizes
    for batch, want in [(1, "small"), (16, "small"), (17, "big"), (1000, "big")]:
        assert fn([torch.empty(batch, 16)], None) == want
    # one kernel at every size: that kernel alone, prepared at the example's size
    bound.clear()
    recorded, fn = dispatch(node, [({"batch": 64}, "big"), ({"batch": 4}, "big")], bind)
    assert recorded == "big" and bound == [("big", 64)] and fn([torch.empty(2, 16)], None) == "big"


# ----------------------------------------------------------------------------- in a compiled model
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.fixture
def size_rule(monkeypatch, tmp_path):
    """Kernel choice by rule, not by timing: a linear at 4 rows or fewer runs the reference
    kernel, a larger one the first library kernel; every other node its first candidate."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    real = plan_module.choose

    def choose(node, kernels, consts):
        if node.op is OpKind.LINEAR and node.inputs[0].type.is_static and node.inputs[0].type.shape[0] <= 4:
            kernels = [k for k in kernels if k.target == "reference"]
        else:
            kernels = [k for k in kernels if k.target != "reference"] or kernels
        return real(node, kernels[:1], consts)

    monkeypatch.setattr(plan_module, "choose", choose)


def _library_linear():
    from kiln.kernels.registry import candidates

    node = Node(OpKind.LINEAR, _linear_node().inputs, None, _linear_node().outputs)
    ks = [k for k in candidates(node, "cpu") if k.target != "reference"]
    if not ks:
        pytest.skip("no library kernel for a symbolic linear on this machine")
    return ks[0].name


def test_a_dynamic_plan_runs_each_sizes_own_choice(size_rule):
    library = _library_linear()
    model = _mlp()
    c = kiln.compile(model, (torch.randn(16, 16),), dynamic=True, codegen=False)
    kernels = [k for _, k in c.report.node_kernels if k.startswith("by-size[")]
    assert kernels and all(decode(k) == [({"batch": 4}, "reference.linear"), ({"batch": 16}, library)]
                           for k in kernels), c.report.node_kernels
    plan = c.compiled[0].plan
    steps = [s for s in plan.steps if isinstance(s.fn, BySize)]
    assert len(steps) == len(kernels) and all(s.fn.bounds == (8,) for s in steps)
    with torch.no_grad():
        for batch in (1, 4, 8, 9, 16, 33):
            x = torch.randn(batch, 16)
            assert steps[0].fn.names[steps[0].fn.pick([x])] == ("reference.linear" if batch <= 8 else library)
            torch.testing.assert_close(c(x), model(x), atol=1e-5, rtol=1e-5)
    # one bucket: one choice per node, at the example's size
    one = kiln.compile(_mlp(), (torch.randn(16, 16),), dynamic=True, codegen=False, size_buckets=1)
    assert not any(k.startswith("by-size[") for _, k in one.report.node_kernels)


def test_a_warm_compile_and_a_loaded_artifact_rebuild_the_same_dispatch(size_rule, tmp_path, monkeypatch):
    _library_linear()
    model = _mlp()
    c = kiln.compile(model, (torch.randn(16, 16),), dynamic=True, codegen=False)
    want = c.report.node_kernels
    assert any(k.startswith("by-size[") for _, k in want)

    def no_choice(*a, **k):
        raise AssertionError("a recorded choice was measured again")

    monkeypatch.setattr(plan_module, "choose", no_choice)
    warm = kiln.compile(_mlp(), (torch.randn(16, 16),), dynamic=True, codegen=False)
    assert warm.report.compile_cache_hit and warm.report.node_kernels == want
    path = str(tmp_path / "mlp.kiln")
    kiln.save(c, path)
    loaded = kiln.load(path)
    assert loaded.compiled[0].report.node_kernels == want
    with torch.no_grad():
        for batch in (2, 8, 9, 40):
            x = torch.randn(batch, 16)
            assert torch.equal(loaded(x), c(x)) and torch.equal(warm(x), c(x))


def test_size_buckets_is_checked():
    for bad in (0, 4, True, "2"):
        with pytest.raises(kiln.KilnError, match="size_buckets must be 1, 2 or 3"):
            kiln.CompileOptions.parse(size_buckets=bad)


def test_a_damaged_record_is_measured_again(size_rule):
    from kiln.runtime.plan import build_plan

    c = kiln.compile(_mlp(), (torch.randn(16, 16),), dynamic=True, codegen=False)
    graph = c.compiled[0].graph
    recorded = [k for _, k in c.report.node_kernels]
    damaged = [k[:-1] if k.startswith("by-size[") else k for k in recorded]  # no closing bracket
    plan = build_plan(graph, "cpu", kernel_choices=damaged, sizes={"batch": 16})
    assert not any(k.startswith("by-size[") for k in plan.node_kernels)  # one choice, at the example's size
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(plan.run([x])[0], _mlp()(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- an LSTM's batch
def _native_rnn():
    from kiln import _C

    if not _C.recurrence_supported():
        pytest.skip("Kiln's C++ recurrences need AVX2 + FMA or AVX-512")


class _Forecaster(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(8, 32, num_layers=1, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


@pytest.fixture
def batch_rule(monkeypatch, tmp_path):
    """Kernel choice by rule: an LSTM of 8 rows or fewer runs the hoisted recurrence, a wider
    one the fused layer; every other node its first library candidate."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    real = plan_module.choose

    def choose(node, kernels, consts):
        if node.op is OpKind.LSTM and node.inputs[0].type.is_static:
            want = "cpu.lstm_hoisted" if node.inputs[0].type.shape[0] <= 8 else "cpu.lstm_layer"
            kernels = [k for k in kernels if k.name == want] or kernels
        else:
            kernels = [k for k in kernels if k.target != "reference"] or kernels
        return real(node, kernels[:1], consts)

    monkeypatch.setattr(plan_module, "choose", choose)


def test_an_lstm_plan_varies_and_dispatches_on_its_batch_not_its_time_steps(batch_rule):
    # an example of 25 series of 131 steps: the time steps are the largest size, but the
    # recurrence's rows are what its kernel choice depends on
    _native_rnn()
    model = _Forecaster().eval()
    c = kiln.compile(model, (torch.randn(25, 131, 8),), dynamic={0: {0: "batch", 1: "seq"}}, codegen=False)
    assert varied_size(c.compiled[0].graph, {"batch": 25, "seq": 131}) == ("batch", 1)
    lstm = [k for label, k in c.report.node_kernels if k.startswith("by-size[") and "lstm" in k]
    # (torch.export traces a batch of 2 or more: the small representative size is 2)
    assert lstm and decode(lstm[0]) == [({"batch": 2, "seq": 131}, "cpu.lstm_hoisted"),
                                        ({"batch": 25, "seq": 131}, "cpu.lstm_layer")], c.report.node_kernels
    step = next(s for s in c.compiled[0].plan.steps if isinstance(s.fn, BySize) and "lstm" in s.kernel)
    with torch.no_grad():
        for batch, steps in [(1, 200), (3, 7), (7, 5), (8, 300), (40, 24)]:
            x = torch.randn(batch, steps, 8)
            # the bound is between 2 and 25 rows (7), whatever the number of steps
            assert step.fn.names[step.fn.pick([x])] == ("cpu.lstm_hoisted" if batch <= 7 else "cpu.lstm_layer")
            torch.testing.assert_close(c(x), model(x), atol=1e-5, rtol=1e-5)

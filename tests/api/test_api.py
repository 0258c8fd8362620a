"""The public API: decorator forms, torch.compile, guards, fallbacks and explain."""
import dataclasses

import pytest
import torch
from torch import nn

import kiln
from kiln import KilnError


class TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y):
        h = self.fc(x) + y
        return h.relu(), {"sum": h.sum(-1), "const": 7}


def test_compile_preserves_structured_outputs():
    m = TwoOut().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    fast = kiln.compile(m, (x, y))
    a, d = fast(x, y)
    ra, rd = m(x, y)
    torch.testing.assert_close(a, ra)
    torch.testing.assert_close(d["sum"], rd["sum"])
    assert d["const"] == 7


def test_decorator_on_function_and_module():
    @kiln.compile
    def f(x, y):
        return torch.tanh(x) * y + 1

    x, y = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(f(x, y), torch.tanh(x) * y + 1)
    torch.testing.assert_close(f(x[:2], y[:2]), torch.tanh(x[:2]) * y[:2] + 1)  # new shape recompiles

    m = nn.Sequential(nn.Linear(5, 5), nn.GELU()).eval()
    fm = kiln.compile(target="reference")(m)  # decorator with options, on a module
    assert isinstance(fm, kiln.CompiledModel)
    torch.testing.assert_close(fm(x), m(x))


def test_torch_compile_backend():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x = torch.randn(4, 8)
    torch._dynamo.reset()
    opt = torch.compile(m, backend="kiln")
    with torch.no_grad():
        torch.testing.assert_close(opt(x), m(x))
        torch.testing.assert_close(opt(x[:1]), m(x[:1]))


def test_torch_compile_backend_takes_kiln_options():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x = torch.randn(4, 8)
    torch._dynamo.reset()
    import kiln.api

    seen = []
    real = kiln.api.CompiledModel.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append(self.options)

    opt = torch.compile(m, backend="kiln", options={"precision": "bf16", "exclude_kernels": ["cpu.mkl_linear"]})
    try:
        kiln.api.CompiledModel.__init__ = spy
        with torch.no_grad():
            out = opt(x)
    finally:
        kiln.api.CompiledModel.__init__ = real
    torch.testing.assert_close(out, m(x), rtol=3e-2, atol=3e-2)  # bf16 GEMMs
    assert seen and seen[0].precision == "bf16" and seen[0].exclude_kernels == {"cpu.mkl_linear"}
    torch._dynamo.reset()
    with pytest.raises(Exception, match="precision must be one of fp32, bf16"):
        torch.compile(m, backend="kiln", options={"precision": "fp16"})(x)


def test_options_are_one_typed_object():
    opts = kiln.CompileOptions.parse(quantize="int8-static", calibration=[torch.randn(2, 8)], sparse="BSR")
    assert opts.quantize.scheme == "int8-static" and len(opts.quantize.calibration) == 1
    assert opts.sparse == "bsr(4,4)" and opts.tune_budget == "none"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.precision = "bf16"
    m = nn.Linear(8, 2).eval()
    x = torch.randn(3, 8)
    fast = kiln.compile(m, (x,), options=opts.replace(quantize=None), precision="bf16")  # keywords override
    assert fast.options.precision == "bf16" and fast.options.sparse == "bsr(4,4)"
    assert fast.report.options is fast.options and fast.report.input_shapes == ((3, 8),)
    with pytest.raises(KilnError, match="unknown kiln.compile option.*known: batch_chunk, calibration"):
        kiln.compile(m, (x,), precison="bf16")
    with pytest.raises(KilnError, match="tune must be one of none, fast, max or a number of seconds"):
        kiln.compile(m, (x,), tune="slow")


def test_guards_name_the_input_and_expectation():
    m = TwoOut().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    fast = kiln.compile(m, (x, y))
    with pytest.raises(KilnError, match=r"compiled for 2 input\(s\) \(x, y\); got 1"):
        fast(x)
    with pytest.raises(KilnError, match="input 'y': expected dtype torch.float32, got torch.float64"):
        fast(x, y.double())
    with pytest.raises(KilnError, match="input 'x': expected rank 2"):
        fast(x[None], y)
    with pytest.raises(KilnError, match="input 'y': expected a tensor"):
        fast(x, 3.0)


def test_device_guard():
    m = nn.Linear(3, 3).eval()
    fast = kiln.compile(m, (torch.randn(1, 3),))
    meta = torch.randn(1, 3, device="meta")
    with pytest.raises(KilnError, match="compiled for device cpu, got meta"):
        fast(meta)


def test_new_shape_never_returns_a_stale_answer():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    fast = kiln.compile(m, (torch.randn(2, 3, 4),))
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(fast(x), m(x))
    with pytest.raises(KilnError):  # 3x5 flattens to 15 features: the model itself cannot run it
        fast(torch.randn(2, 3, 5))


class Unsupported(nn.Module):
    def forward(self, x):
        # (cumsum, vector_norm, atan and sort were; now converted)
        return torch.lgamma(x).relu() + torch.cummax(x, 1).values


def test_unsupported_ops_fall_back_and_are_explained():
    m = Unsupported()
    x = torch.randn(3, 6)
    fast = kiln.compile(m, (x,))
    torch.testing.assert_close(fast(x), m(x))
    ex = kiln.explain(m, (x,))
    ops = sorted(op for op, _, _ in ex.fallbacks)
    assert ops == ["aten.cummax.default", "aten.lgamma.default"]
    assert all("no Kiln converter" in why for _, _, why in ex.fallbacks)
    assert "aten.lgamma.default" in str(ex)


def test_explain_profiles_each_step_and_totals_the_fallbacks_time():
    """Every plan step is timed (a time share per fallback op, named by its torch op);
    the shares are the steps' own times, whatever they are (no timing asserted)."""
    m = Unsupported()
    x = torch.randn(3, 6)
    ex = kiln.explain(m, (x,), runs=2)
    fast = kiln.compile(m, (x,))
    assert len(ex.steps) == len(fast.compiled[0].plan.steps)
    assert all(s.seconds >= 0 for s in ex.steps)
    total, by_op = ex.fallback_time()
    assert sorted(by_op) == ["aten.cummax.default", "aten.lgamma.default"]
    assert all(n == 1 for n, _ in by_op.values())
    assert total == pytest.approx(sum(s.seconds for s in ex.steps))
    assert sum(t for _, t in by_op.values()) == pytest.approx(sum(s.seconds for s in ex.steps if s.fallback))
    text = str(ex)
    assert "median of 2 runs" in text and "aten.cummax.default x1:" in text and "costliest steps:" in text
    by_kernel = ex.kernel_time()
    assert sum(n for n, _ in by_kernel.values()) == len(ex.steps)
    assert sum(t for _, t in by_kernel.values()) == pytest.approx(total)
    assert "time by kernel:" in text
    assert kiln.explain(m, (x,), profile=False).steps == []
    with pytest.raises(KilnError, match="runs must be at least 1"):
        kiln.explain(m, (x,), runs=0)


def test_explain_cli_passes_precision_quantize_and_threads_to_the_compile(monkeypatch, capsys):
    """``kiln explain --precision/--quantize/--threads`` compile as ``kiln.compile`` with those
    options would (int8-static calibrated on the example inputs)."""
    import kiln.api
    from kiln.cli import main

    seen = {}
    real = kiln.api.explain

    def spy(model, inputs, **kw):
        seen.update(kw)
        return real(model, inputs, **kw)

    monkeypatch.setattr(kiln.api, "explain", spy)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.setdefault("set_threads", n))
    assert main(["explain", "lstm", "--quantize", "int8-static", "--precision", "bf16", "--threads", "1",
                 "--no-profile"]) == 0
    assert seen["quantize"] == "int8-static" and seen["precision"] == "bf16" and seen["threads"] == 1
    assert seen["set_threads"] == 1 and len(seen["calibration"]) == 1
    assert "kernels:" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(KilnError, match="unknown target"):
        kiln.compile(nn.Linear(2, 2), (torch.randn(1, 2),), target="tpu")
    with pytest.raises(KilnError, match="expects an nn.Module"):
        kiln.compile(42, ())
    with pytest.raises(KilnError, match="unknown kiln.compile option"):
        kiln.compile(nn.Linear(2, 2), (torch.randn(1, 2),), fast_math=True)


def test_export_failure_is_a_kiln_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(KilnError, match="torch.export could not trace"):
        kiln.compile(DataDependent(), (torch.randn(3),))


def test_threads_option_compiles_and_runs_with_that_many_threads():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = kiln.compile(m, (x,), threads=1)
        assert torch.get_num_threads() == 2  # restored after compiling
        c = fast.compiled[0]
        seen = []

        def watched(s):
            def fn(ins, a):
                seen.append(torch.get_num_threads())
                return s.fn(ins, a)
            return dataclasses.replace(s, fn=fn)

        c.plan = dataclasses.replace(c.plan, steps=tuple(watched(s) for s in c.plan.steps))
        with torch.no_grad():
            torch.testing.assert_close(fast(x), m(x))
        assert seen and set(seen) == {1}  # every kernel ran with one thread
        assert torch.get_num_threads() == 2  # restored after the call
        assert [k[0] for k in fast._plans] == [("threads", 1)]  # the plan was built for one thread
    finally:
        torch.set_num_threads(old)
    with pytest.raises(KilnError, match="threads must be a positive int"):
        kiln.compile(m, (x,), threads=0)


def test_specializations_are_bounded_lru_and_warn_once():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    fast = kiln.compile(m, (torch.randn(1, 8),), max_specializations=2)
    with torch.no_grad():
        fast(torch.randn(2, 8))
        fast(torch.randn(1, 8))  # batch 1 used last: batch 2 is the least recently used
        with pytest.warns(kiln.KilnWarning, match="more than 2 input signatures"):
            fast(torch.randn(3, 8))
        assert sorted(c.report.input_shapes[0][0] for c in fast.compiled) == [1, 3]
        import warnings

        x4 = torch.randn(4, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning is given once
            out = fast(x4)
        torch.testing.assert_close(out, m(x4))
        assert sorted(c.report.input_shapes[0][0] for c in fast.compiled) == [3, 4]
    with pytest.raises(KilnError, match="max_specializations must be a positive int"):
        kiln.compile(m, max_specializations=0)

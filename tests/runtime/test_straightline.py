"""The plan's generated straight-line executor (runtime/straightline.py): same results as
the steps run one by one, buffers dropped after their last use, failures named by node."""
import dataclasses
import weakref

import pytest
import torch
from torch import nn

import kiln
from kiln.runtime.plan import KernelFailure


class _Model(nn.Module):
    """A multi-output kernel (LSTM: y, h_n, c_n with c_n unused), a returned input, and a
    chain of intermediates that die early."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x, extra):
        y, (h, _) = self.rnn(x)
        z = torch.relu(self.head(y[:, -1])) * 2.0 + 1.0
        return z, h, extra


def _compiled(target):
    torch.manual_seed(0)
    m = _Model().eval()
    ins = (torch.randn(2, 5, 4), torch.randn(3))
    return m, ins, kiln.compile(m, ins, target=target)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_generated_executor_matches_steps_and_eager(target):
    m, ins, cm = _compiled(target)
    plan = cm.compiled[0].plan
    with torch.no_grad():
        got = plan.run(list(ins))
        want = plan.interpret(list(ins))  # the steps one at a time over a slot list
        eager = m(*ins)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert got[2] is ins[1]  # a returned input is the input itself


def test_buffers_die_after_their_last_use():
    _, ins, cm = _compiled("reference")
    plan = cm.compiled[0].plan
    refs: dict[int, weakref.ref] = {}
    seen_dead: list[bool] = []
    freed_before: list[int] = []

    def watch(k, s):
        def fn(args, attrs):
            held = [r() for j, r in refs.items() if j not in freed_before and r() is not None]
            # a freed slot's tensor may live on as a live one, or as the base of a live view
            live = {id(t) for t in held} | {id(t._base) for t in held if t._base is not None}
            seen_dead.extend(refs[i]() is None or id(refs[i]()) in live for i in freed_before if i in refs)
            r = s.fn(args, attrs)
            for i, t in zip(s.outs, r if len(s.outs) > 1 else (r,)):
                if isinstance(t, torch.Tensor):
                    refs[i] = weakref.ref(t)
            freed_before.extend(s.free)
            return r
        return fn

    steps = tuple(dataclasses.replace(s, fn=watch(k, s)) for k, s in enumerate(plan.steps))
    watched = dataclasses.replace(plan, steps=steps)
    with torch.no_grad():
        watched.run(list(ins))
    assert seen_dead and all(seen_dead)


def test_failure_names_the_node_and_keeps_the_cause():
    _, ins, cm = _compiled("reference")
    plan = cm.compiled[0].plan
    k = next(i for i, s in enumerate(plan.steps) if s.node.op.value == "linear")

    def boom(args, attrs):
        raise RuntimeError("deliberate")

    steps = list(plan.steps)
    steps[k] = dataclasses.replace(steps[k], fn=boom)
    broken = dataclasses.replace(plan, steps=tuple(steps))
    with pytest.raises(KernelFailure, match=r"kernel reference\.linear for linear.*failed: deliberate") as e:
        broken.run(list(ins))
    assert isinstance(e.value, kiln.KilnError) and isinstance(e.value.__cause__, RuntimeError)


def test_wrong_input_count_is_an_error():
    _, ins, cm = _compiled("reference")
    with pytest.raises(ValueError, match="plan takes 2 inputs, got 1"):
        cm.compiled[0].plan.run([ins[0]])


def test_plans_with_no_steps_or_returned_inputs_and_constants():
    x, y = torch.randn(2), torch.randn(3)
    ident = kiln.compile(lambda a: a, (x,))
    assert len(ident.compiled[0].plan.steps) == 0 and ident(x) is x
    swap = kiln.compile(lambda a, b: (b, a + 1, torch.ones(3)), (x, y))
    got = swap(x, y)
    assert got[0] is y
    torch.testing.assert_close(got[1], x + 1)
    torch.testing.assert_close(got[2], torch.ones(3))


def test_long_plans_generate_and_run():
    """Thousands of steps and constants (the generated source indexes them, so its size and
    compile time grow linearly)."""
    from types import SimpleNamespace

    from kiln.runtime.straightline import generate

    n = 3000
    consts = tuple((n + 1 + i, torch.tensor(float(i))) for i in range(n))
    steps = [SimpleNamespace(fn=lambda ins, a: ins[0] + ins[1], attrs=None, ins=(i, n + 1 + i), outs=(i + 1,),
                             free=(i,) if i else ()) for i in range(n)]
    forward = generate(steps, (0,), (n,), consts)
    assert float(forward([torch.tensor(0.0)], dict(consts))[0]) == sum(range(n))


def test_symbolic_attributes_resolve_per_size_tuple_in_a_bounded_memo():
    from kiln.ir import attrs as A
    from kiln.ir.types import Sym
    from kiln.runtime import straightline

    r = straightline.ResolvedAttrs(A.ShapeAttrs((Sym("batch"), Sym("seq"), 4)))
    assert r({"batch": 2, "seq": 7}).shape == (2, 7, 4)
    assert r({"batch": 1, "seq": 129}).shape == (1, 129, 4)
    assert r({"batch": 2, "seq": 7}) is r({"batch": 2, "seq": 7})  # evaluated once per size tuple
    for s in range(3 * straightline.MAX_SIZES):
        assert r({"batch": 1, "seq": s + 1}).shape == (1, s + 1, 4)
        assert len(r.memo) <= straightline.MAX_SIZES

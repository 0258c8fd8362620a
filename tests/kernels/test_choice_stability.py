"""Kernel choice decides away from its prior only outside the measured noise (kernels/decide.py,
kernels/choice.py). Every timing here is faked: no test depends on this machine's clock."""
import pytest
import torch

from kiln.ir import GraphBuilder, OpKind
from kiln.kernels import choice, decide
from kiln.kernels.registry import Kernel


# ----------------------------------------------------------------------------- the rule
def test_clear_winner_beats_the_prior():
    d = decide.decide([[1.0, 1.0, 1.01], [0.5, 0.5, 0.51]], prior=[0, 1])
    assert d.winner == 1 and d.tied == (1,) and not d.ambiguous


def test_difference_inside_the_noise_goes_to_the_prior():
    # 0 is 8% faster at its best, but its rounds spread 20%: a tie, which the prior (1) takes
    noisy = [0.92, 1.1, 1.15]
    steady = [1.0, 1.0, 1.01]
    for prior in ([1, 0], [0, 1]):
        d = decide.decide([noisy, steady], prior)
        assert set(d.tied) == {0, 1} and d.winner == prior[0]
    assert decide.decide([noisy, steady], [1, 0]).ambiguous  # more rounds could tell them apart


def test_differences_under_the_minimum_margin_never_decide():
    a, b = [1.0] * 5, [1.0 - decide.MIN_MARGIN / 2] * 5  # no noise at all, 2.5% apart
    assert decide.decide([a, b], [0, 1]).winner == 0
    assert decide.decide([a, b], [1, 0]).winner == 1
    assert not decide.decide([a, b], [0, 1]).ambiguous


def test_failed_candidates_never_win_and_all_failed_is_none():
    assert decide.decide([[], [2.0]], [0, 1]).winner == 1
    assert decide.decide([[], []], [0, 1]) is None
    assert decide.clearly_faster([1.0], []) and not decide.clearly_faster([], [1.0])


def test_prior_order_puts_the_earlier_winner_first():
    assert decide.prior_order(["a", "b", "c"], "c") == [2, 0, 1]
    assert decide.prior_order(["a", "b"], None) == [0, 1]
    assert decide.prior_order(["a", "b"], "gone") == [0, 1]  # a winner no longer a candidate


def test_noise_is_median_over_best():
    assert decide.noise([1.0]) == 0.0
    assert decide.noise([1.0, 1.2, 1.5]) == pytest.approx(0.2)


def test_rounds_are_compared_pairwise_so_a_drift_is_not_noise():
    # the machine speeds up 40% over the rounds; candidate 1 is 20% faster in every round.
    # Best round against best round, the drift would pass for noise and leave them tied.
    drift = [1.0, 0.9, 0.8, 0.7, 0.6]
    slow, fast = [t * 1.25 for t in drift], drift
    d = decide.decide([slow, fast], prior=[0, 1])
    assert d.winner == 1 and d.tied == (1,)
    assert decide.noise(slow) > 0.2  # what the unpaired rule would have taken for noise


def test_pairwise_wins_need_most_rounds_not_a_median():
    # 30% faster in three rounds of seven, level in the rest: the median round is level
    a, b = [0.7, 0.7, 0.7, 1.0, 1.0, 1.0, 1.0], [1.0] * 7
    assert not decide.clearly_faster(a, b)
    # 10% faster in two rounds of three: a sign test wants all three
    assert not decide.clearly_faster([0.9, 0.9, 1.2], [1.0, 1.0, 1.0])
    assert decide.clearly_faster([0.9, 0.9, 0.9], [1.0, 1.0, 1.0])


def test_rounds_not_run_are_none_and_only_common_rounds_pair():
    # a joined batch: candidate 0 missed rounds 2-3 (raced out, then timed again)
    a, b = [2.0, 2.0, None, None, 1.0, 1.0, 1.0], [1.0] * 7
    assert decide.best(a) == 1.0 and decide.rounds(a) == [2.0, 2.0, 1.0, 1.0, 1.0]
    assert decide.noise([None, 1.0, 1.2, 1.5]) == pytest.approx(0.2)
    assert not decide.clearly_faster(b, a)  # two of five common rounds: no clear win
    assert decide.decide([[None, None], [1.0]], [0, 1]).winner == 1  # ran no round: failed


# ----------------------------------------------------------------------------- choose()
def _node():
    b = GraphBuilder()
    x = b.input("x", (4, 8))
    y = b.add(OpKind.RELU, x)
    return b.build([y]).nodes[0]


def _kernels():
    ref = Kernel(OpKind.RELU, "reference", "reference.relu", lambda ins, a: torch.relu(ins[0]))
    fast = Kernel(OpKind.RELU, "cpu", "cpu.fast", lambda ins, a: torch.relu(ins[0]))
    other = Kernel(OpKind.RELU, "cpu", "cpu.other", lambda ins, a: ins[0].clamp_min(0))
    return [fast, other, ref]


@pytest.fixture
def fake_clock(monkeypatch, tmp_path):
    """choice.samples faked: candidate i's rounds are ``times[i]`` (a list, or a function of
    the batch number). A fresh memo and tuning database per test."""
    monkeypatch.setenv("KILN_TUNING_DB", str(tmp_path / "tuning.sqlite"))
    monkeypatch.setattr(choice, "_MEMO", {})
    state = {"times": [], "batches": 0}

    def samples(fns, rounds, settled=None):
        state["batches"] += 1
        out = []
        for fn, t in zip(fns, state["times"]):
            if fn is None:
                out.append([])
                continue
            fn()  # each candidate still runs, so one that raises would show
            out.append(list(t(state["batches"]) if callable(t) else t))
        return out

    monkeypatch.setattr(choice, "samples", samples)
    return state


def test_choose_takes_a_clear_winner_and_records_it(fake_clock):
    fake_clock["times"] = [[2.0] * 5, [1.0] * 5, [3.0] * 5]
    k, _ = choice.choose(_node(), _kernels(), [None])
    assert k.name == "cpu.other"
    assert fake_clock["batches"] == 2  # against the prior: confirmed by a second batch
    key = next(iter(choice._MEMO))
    assert choice.earlier_winner("node", key) == "cpu.other"


def test_choose_ties_go_to_registration_order_in_every_process(fake_clock):
    # cpu.other is 3% faster at its best: inside MIN_MARGIN, so the first registered wins
    fake_clock["times"] = [[1.0] * 5, [0.97] * 5, [1.5] * 5]
    for _ in range(3):  # as in three fresh processes: memo cleared each time (the database kept)
        choice._MEMO.clear()
        assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.fast"


def test_a_recorded_winner_is_reused_without_timing(fake_clock):
    fake_clock["times"] = [[2.0] * 5, [1.0] * 5, [3.0] * 5]  # a clear win for cpu.other, recorded
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.other"
    batches = fake_clock["batches"]
    choice._MEMO.clear()  # as in a fresh process: the tuning database decides, nothing is timed
    fake_clock["times"] = [[0.5] * 5, [1.0] * 5, [3.0] * 5]
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.other"
    assert fake_clock["batches"] == batches
    with choice.remeasuring():  # kiln tune: measured afresh, and the new winner recorded
        assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.fast"
    choice._MEMO.clear()
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.fast"


def test_ties_go_to_the_databases_earlier_winner_when_remeasured(fake_clock):
    fake_clock["times"] = [[2.0] * 5, [1.0] * 5, [3.0] * 5]
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.other"
    choice._MEMO.clear()  # a fresh process, told to measure again: the database's record is the prior
    fake_clock["times"] = [[0.98] * 5, [1.0] * 5, [3.0] * 5]  # now a tie: the earlier winner stays
    with choice.remeasuring():
        assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.other"


def test_a_recorded_winner_that_disagrees_here_is_measured_again(fake_clock):
    ks = _kernels()
    choice.record_winner("node", _key_of(_node(), [_wrong(), *ks]), "cpu.wrong", 1.0)
    fake_clock["times"] = [[0.1] * 5, [1.0] * 5, [2.0] * 5, [3.0] * 5]
    assert choice.choose(_node(), [_wrong(), *ks], [None])[0].name == "cpu.fast"
    assert fake_clock["batches"] >= 1


def _wrong():
    return Kernel(OpKind.RELU, "cpu", "cpu.wrong", lambda ins, a: torch.relu(ins[0]) + 1)


def _key_of(node, kernels):
    """The decision's key as ``choice.choose`` forms it (recorded by a test, as if by an
    earlier process that saw a kernel agree on other constants)."""
    return (torch.get_num_threads(), tuple(k.name for k in kernels), node.op, node.attrs,
            tuple(None if v is None else repr(v.type) for v in node.inputs))


def test_an_ambiguous_first_batch_gets_more_rounds(fake_clock):
    # batch 1: cpu.other 10% faster in two rounds, level in three (a tie, ambiguous); batch 2 settles it
    fake_clock["times"] = [[1.0] * 5, lambda b: [0.9, 0.9, 1.0, 1.0, 1.0] if b == 1 else [0.9] * 20, [3.0] * 5]
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.other"
    assert fake_clock["batches"] == 2


def test_remeasuring_ignores_the_memo(fake_clock):
    fake_clock["times"] = [[1.0] * 5, [2.0] * 5, [3.0] * 5]
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.fast"
    assert fake_clock["batches"] == 1  # the prior's pick won clearly: one batch
    fake_clock["times"] = [[2.0] * 5, [1.0] * 5, [3.0] * 5]
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.fast"  # memoized: not timed
    assert fake_clock["batches"] == 1
    with choice.remeasuring():
        assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.other"
    assert fake_clock["batches"] == 3


def test_a_win_against_the_prior_that_does_not_repeat_is_not_taken(fake_clock):
    # batch 1: cpu.other clearly faster (a noisy moment for cpu.fast); batch 2: equal
    fake_clock["times"] = [lambda b: [2.0] * 5 if b == 1 else [1.0] * 5, [1.0] * 5, [3.0] * 5]
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.fast"
    assert fake_clock["batches"] == 2
    # and one that repeats is taken (measured again: the database recorded cpu.fast)
    fake_clock["batches"] = 0
    fake_clock["times"] = [[2.0] * 5, [1.0] * 5, [3.0] * 5]
    with choice.remeasuring():
        assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.other"


def test_a_priors_pick_beaten_on_both_batches_is_not_kept(fake_clock):
    # measured rounds (ms) of one fp32 linear at two threads, the machine ~20% faster in the
    # second batch. Batch 1: cpu.other and the reference tied, cpu.fast (the prior's pick)
    # beaten; batch 2: cpu.other clearly first. The joint rounds beat cpu.fast in 9 of 10,
    # so it cannot stand as "not reproduced".
    fake_clock["times"] = [
        lambda b: [3.96, 4.45, 4.1, 3.92, 3.83] if b == 1 else [3.8, 4.71, 3.33, 3.24, 3.77],
        lambda b: [4.18, 3.65, 3.7, 3.23, 3.3] if b == 1 else [3.38, 2.58, 2.57, 2.71, 2.94],
        lambda b: [3.75, 3.76, 3.81, 3.46, 3.65] if b == 1 else [3.67, 3.41, 3.16, 3.18, 3.17]]
    ks = _kernels()
    ks[2] = Kernel(OpKind.RELU, "cpu", "cpu.third", lambda ins, a: torch.relu(ins[0]))
    ks = [ks[0], ks[1], ks[2], _kernels()[2]]
    fake_clock["times"].append([9.0] * 5)
    assert choice.choose(_node(), ks, [None])[0].name == "cpu.other"
    assert fake_clock["batches"] == 2


def test_a_kernel_that_disagrees_never_wins(fake_clock):
    ks = _kernels()
    wrong = _wrong()
    fake_clock["times"] = [[0.1] * 5, [1.0] * 5, [2.0] * 5, [3.0] * 5]
    assert choice.choose(_node(), [wrong, *ks], [None])[0].name == "cpu.fast"


def test_median_is_statistics_median():
    import statistics

    from kiln.kernels.timing import median

    for xs in ([3.0], [2.0, 1.0], [5.0, 1.0, 4.0], [0.5, 0.25, 2.0, 1.0], [1e-6] * 4):
        assert median(xs) == statistics.median(xs)
    with pytest.raises(ValueError):
        median([])


class _FakeClock:
    """``time.perf_counter`` for ``kernels.timing``: advanced only by the timed functions."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_a_candidate_far_behind_is_raced_out_after_two_rounds(monkeypatch):
    from kiln.kernels import timing

    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    calls = [0, 0, 0]

    def cost(i, seconds):
        def fn():
            calls[i] += 1
            clock.now += seconds
        return fn

    # 1.0 (the best), 1.5 (inside the race ratio), 2.0 (past it: dropped after round 2)
    got = timing.interleaved([cost(0, 1.0), cost(1, 1.5), cost(2, 2.0)], rounds=6, race=1.75)
    assert calls == [6, 6, 2]
    assert [len(t.samples) for t in got] == [6, 6, 2]
    assert got[2].best == 2.0  # its rounds are kept: it loses on them
    clock.now = 0.0
    assert [len(t.samples) for t in timing.interleaved([cost(0, 1.0), cost(2, 2.0)], rounds=6)] == [6, 6]


def test_a_raced_out_candidate_is_not_timed_again_in_the_confirming_batch(fake_clock, monkeypatch):
    # batch 1: cpu.other clearly beats the prior's pick; the reference was raced out after two
    # rounds. The confirming batch times only the first two; the reference keeps its rounds.
    fake_clock["times"] = [[2.0] * 5, [1.0] * 5, [9.0] * 2]
    seen, fake = [], choice.samples

    def spy(fns, rounds, settled=None):
        seen.append([fn is not None for fn in fns])
        return fake(fns, rounds)

    monkeypatch.setattr(choice, "samples", spy)
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.other"
    assert seen == [[True, True, True], [True, True, False]]


def test_the_priors_pick_is_timed_again_even_when_raced_out(fake_clock, monkeypatch):
    # batch 1: the prior's pick (cpu.fast) had two bad rounds and was raced out; a win against
    # it must be reproduced with it in the confirming batch, where it is as fast as cpu.other
    fake_clock["times"] = [lambda b: [3.0] * 2 if b == 1 else [1.0] * 5, [1.0] * 5, [9.0] * 2]
    seen, fake = [], choice.samples

    def spy(fns, rounds, settled=None):
        seen.append([fn is not None for fn in fns])
        return fake(fns, rounds)

    monkeypatch.setattr(choice, "samples", spy)
    assert choice.choose(_node(), _kernels(), [None])[0].name == "cpu.fast"  # not reproduced: the prior stands
    assert seen == [[True, True, True], [True, True, False]]


def test_timing_ends_once_settled_but_not_before_three_rounds(monkeypatch):
    from kiln.kernels import timing

    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    calls = [0, 0]

    def cost(i, seconds):
        def fn():
            calls[i] += 1
            clock.now += seconds
        return fn

    asked = []

    def settled(got):
        asked.append([len(s) for s in got])
        return True

    timing.interleaved([cost(0, 1.0), cost(1, 1.2)], rounds=5, settled=settled)
    assert calls == [3, 3] and asked == [[3, 3]]
    calls[:] = [0, 0]
    timing.interleaved([cost(0, 1.0), cost(1, 1.2)], rounds=5, settled=lambda got: False)
    assert calls == [5, 5]


def test_the_priors_clear_win_settles_the_first_batch_early(monkeypatch, tmp_path):
    # the real clock's rounds replaced by fixed costs: cpu.fast (the prior's pick) 1.0, the
    # others 1.3 and 1.5 -- a clear win after three rounds, so two rounds are never run
    from kiln.kernels import timing

    monkeypatch.setenv("KILN_TUNING_DB", str(tmp_path / "tuning.sqlite"))
    monkeypatch.setattr(choice, "_MEMO", {})
    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    calls = {"cpu.fast": 0, "cpu.other": 0, "reference.relu": 0}
    cost = {"cpu.fast": 1.0, "cpu.other": 1.3, "reference.relu": 1.5}

    def timed(name, fn):
        def run(ins, attrs):
            calls[name] += 1
            clock.now += cost[name]
            return fn(ins, attrs)
        return run

    ks = [Kernel(k.op, k.target, k.name, timed(k.name, k.fn)) for k in _kernels()]
    assert choice.choose(_node(), ks, [None])[0].name == "cpu.fast"
    # the reference: its expected-output call and 3 rounds; the others a warm call and 3 rounds
    assert calls == {"cpu.fast": 4, "cpu.other": 4, "reference.relu": 4}

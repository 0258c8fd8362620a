"""kernels.choice.agrees: the check every candidate kernel passes before it can be chosen.
Its fast path (finite outputs) must give the exact path's verdicts."""
import math

import torch

from kiln.kernels import choice
from kiln.kernels.choice import agrees


def _exact(o, r, rel):
    # the definition: max |o - r| in float64 over the finite differences, against rel * max(1, max |r|)
    scale = max(1.0, float(r.double().abs().nan_to_num(0, 0, 0).max())) if r.numel() else 1.0
    d = (o.double() - r.double()).abs().nan_to_num(0, 0, 0)
    return (not d.numel() or bool((d <= rel * scale).all())) and torch.equal(o.isnan(), r.isnan())


def test_verdicts_match_the_float64_definition_on_random_pairs():
    g = torch.Generator().manual_seed(0)
    for i in range(300):
        dt = (torch.float32, torch.float64, torch.bfloat16)[i % 3]
        rel = 1e-4 if dt != torch.bfloat16 else 3e-2
        shape = [(), (0,), (7,), (3, 5, 2)][i % 4]
        r = (torch.randn(shape, generator=g) * 10 ** (i % 5 - 2)).to(dt)
        # errors spread around the bound: some pass, some fail
        bound = rel * max(1.0, float(r.double().abs().max())) if r.numel() else rel
        noise = torch.randn(shape, generator=g, dtype=torch.float64) * bound * (0.2 + (i % 7) * 0.3)
        o = (r.double() + noise).to(dt)
        assert agrees(o, r) == _exact(o, r, rel), (i, dt, shape)


def test_non_finite_values_take_the_exact_path():
    r = torch.tensor([1.0, float("nan"), 3.0])
    assert agrees(r.clone(), r)  # NaN in the same place
    assert not agrees(torch.tensor([1.0, 2.0, 3.0]), r)  # NaN only in the reference
    assert not agrees(torch.tensor([1.0, float("nan"), float("nan")]), r)
    inf = torch.tensor([1.0, float("inf")])
    assert agrees(inf.clone(), inf)
    assert choice._finite_max_error(inf, inf) is None
    assert choice._finite_max_error(torch.tensor([float("nan")]), torch.tensor([0.0])) is None


def test_fast_path_reports_the_error_and_scale():
    o, r = torch.tensor([1.0, -5.0, 2.5]), torch.tensor([1.0, -4.0, 2.0])
    err, scale = choice._finite_max_error(o, r)
    assert math.isclose(err, 1.0) and scale == 4.0
    assert choice._finite_max_error(torch.zeros(3), torch.full((3,), 0.25)) == (0.25, 1.0)

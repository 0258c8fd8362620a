"""kiln.sparsify: exact per-layer sparsity for every pattern; distillation keeps masks fixed."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kiln
from kiln.pruning import layer_sparsity, prunable_layers


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(24 * 25, 40), nn.ReLU(), nn.Linear(40, 10)).eval()


def _zeros(w):
    return int((w == 0).sum())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 1.0])
def test_unstructured_is_exact(sparsity):
    m = _model()
    p = kiln.sparsify(m, sparsity, "unstructured")
    for (_, a), (_, b) in zip(prunable_layers(m), prunable_layers(p)):
        assert _zeros(b.weight) == round(sparsity * a.weight.numel())
        kept = b.weight != 0  # the largest magnitudes survive
        if 0 < sparsity < 1:
            assert a.weight.abs()[kept].min() >= a.weight.abs()[~kept].max()
    assert all(_zeros(a.weight) == 0 for _, a in prunable_layers(m))  # the original is untouched


def test_two_four_has_exactly_two_per_group():
    p = kiln.sparsify(_model(), 0.5, "2:4")
    for name, mod in prunable_layers(p):
        w = mod.weight.reshape(mod.weight.shape[0], -1)
        if w.shape[1] % 4:
            assert _zeros(w) == 0, f"{name}: not a multiple of 4 inputs, so left dense"
            continue
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()), name
    with pytest.raises(kiln.KilnError):
        kiln.sparsify(_model(), 0.6, "2:4")


@pytest.mark.parametrize("r,c", [(4, 4), (2, 8), (3, 5)])
def test_block_prunes_whole_blocks_exactly(r, c):
    p = kiln.sparsify(_model(), 0.75, f"block({r},{c})")
    for name, mod in prunable_layers(p):
        w = mod.weight.reshape(mod.weight.shape[0], -1)
        n, k = w.shape
        rows, cols = -(-n // r), -(-k // c)
        padded = torch.zeros(rows * r, cols * c)
        padded[:n, :k] = w
        blocks_nz = (padded.reshape(rows, r, cols, c) != 0).any(3).any(1)
        assert int((~blocks_nz).sum()) == round(0.75 * rows * cols), name


def test_channel_zeroes_whole_output_rows():
    m = _model()
    p = kiln.sparsify(m, 0.5, "channel", layers=["5"])
    w = p[5].weight
    zero_rows = (w == 0).all(1)
    assert int(zero_rows.sum()) == 20 and _zeros(w) == 20 * w.shape[1]
    assert _zeros(p[0].weight) == 0  # not selected


def test_layer_selection():
    m = _model()
    assert [n for n, _ in prunable_layers(m, ["0", "7"])] == ["0", "7"]
    assert [n for n, _ in prunable_layers(m, lambda n, mod: isinstance(mod, nn.Linear))] == ["5", "7"]
    with pytest.raises(kiln.KilnError):
        kiln.sparsify(m, 0.5, "unstructured", layers=["nothing"])
    with pytest.raises(kiln.KilnError):
        kiln.sparsify(m, 0.5, "diagonal")


def test_distillation_keeps_masks_and_learns():
    m = _model()
    with torch.no_grad():
        m[7].weight.mul_(20)  # confident logits, so the KL to the teacher is not tiny to begin with
    torch.manual_seed(1)
    x = torch.randn(64, 3, 5, 5)
    y = m(x).argmax(-1)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    pruned = kiln.sparsify(m, 0.8, "unstructured")
    masks = {n: mod.weight != 0 for n, mod in prunable_layers(pruned)}
    with torch.no_grad():
        before = float(torch.nn.functional.kl_div(pruned(x).log_softmax(-1), m(x).log_softmax(-1), log_target=True,
                                                  reduction="batchmean"))
    recovered = kiln.sparsify(m, 0.8, "unstructured", data=data, steps=40, lr=1e-3, alpha=1.0)
    with torch.no_grad():
        after = float(torch.nn.functional.kl_div(recovered(x).log_softmax(-1), m(x).log_softmax(-1), log_target=True,
                                                 reduction="batchmean"))
    for n, mod in prunable_layers(recovered):
        assert bool((mod.weight[~masks[n]] == 0).all()), f"{n}: a pruned weight came back"
    assert after < before
    assert layer_sparsity(recovered)["5"] >= 0.8


def test_distill_stops_on_an_exhausted_iterator():
    """A one-shot iterator of one batch gives one step, not ten and not a hang: distill
    returns the fine-tuned student, its pruned weights still zero."""
    m = _model()
    x = torch.randn(8, 3, 5, 5)
    student = kiln.sparsify(m, 0.5)
    start = {n: mod.weight.detach().clone() for n, mod in prunable_layers(student)}
    teacher_calls = []
    m.register_forward_hook(lambda *_: teacher_calls.append(1))  # the teacher runs once per step
    with torch.no_grad():
        batch = (x, m(x).argmax(-1))
    teacher_calls.clear()
    out = kiln.distill(student, m, iter([batch]), steps=10)  # one batch, then done
    assert out is student and not out.training
    assert len(teacher_calls) == 1
    assert any(not torch.equal(mod.weight, start[n]) for n, mod in prunable_layers(out))  # it did train
    for n, mod in prunable_layers(out):
        assert bool((mod.weight[start[n] == 0] == 0).all()), f"{n}: a pruned weight came back"
    # an empty iterator: no step at all
    teacher_calls.clear()
    kiln.distill(student, m, iter([]), steps=10)
    assert not teacher_calls

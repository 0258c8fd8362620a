"""dynamic=: one compiled plan serves every size of the dims that vary, matching eager at odd
sizes and the range ends; sizes outside the range, or inconsistent between inputs, are
KilnErrors naming the input, the dim and the range."""
import pytest
import torch

import kiln
from kiln import KilnError, models
from kiln.ir.types import Sym

from conftest import max_err_ok


def _logits(out):
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])


def _tokens(batch, seq, like, vocab=100):
    return torch.randint(0, vocab, (batch, seq)), torch.ones(batch, seq, dtype=like.dtype)


@pytest.mark.parametrize("name", ["bert", "hf_bert"])
def test_bert_serves_every_batch_and_length_with_one_plan(name):
    model, inputs = getattr(models, name)(layers=2, hidden=64, heads=4, ffn=128, vocab=1000)
    fast = kiln.compile(model, inputs, dynamic=True)
    g = fast.compiled[0].graph
    assert g.inputs[0].type.shape == (Sym("batch"), Sym("seq"))
    with torch.no_grad():
        for batch, seq in [(1, 1), (1, 7), (3, 129), (2, 128), (5, 33)]:
            args = _tokens(batch, seq, inputs[1])
            ok, err, tol = max_err_ok(_logits(fast(*args)), _logits(model(*args)))
            assert ok, f"{name} {batch}x{seq}: {err} > {tol}"
    assert len(fast.compiled) == 1  # no recompile per shape


def test_hf_bert_takes_the_models_own_length_limit():
    model, inputs = models.hf_bert(layers=1, hidden=32, heads=2, ffn=64, vocab=100)
    fast = kiln.compile(model, inputs, dynamic=True)
    with torch.no_grad():
        args = _tokens(1, 512, inputs[1])  # the position table's last row: still served
        ok, err, tol = max_err_ok(_logits(fast(*args)), _logits(model(*args)))
        assert ok, (err, tol)
    with pytest.raises(KilnError, match=r"input 'input_ids' dim 1 \(seq\) is 513, outside the compiled range \[1, 512\]"):
        fast(*_tokens(1, 513, inputs[1]))


def test_sizes_of_one_name_must_agree():
    model, inputs = models.bert(layers=1, hidden=32, heads=2, ffn=64, vocab=100)
    fast = kiln.compile(model, inputs, dynamic=True)
    ids, _ = _tokens(2, 9, inputs[1])
    _, mask = _tokens(2, 8, inputs[1])
    with pytest.raises(KilnError, match=r"input 'attention_mask' dim 1 \(seq\) is 8 but input 'input_ids' dim 1 "
                                        r"gives seq = 9"):
        fast(ids, mask)


def test_resnet_batch_dim_with_an_explicit_range():
    model, inputs = models.resnet18(batch=2, image=32, num_classes=10)
    fast = kiln.compile(model, inputs, dynamic={0: {0: ("batch", 1, 8)}})
    with torch.no_grad():
        for batch in (1, 7, 8, 3):
            x = torch.randn(batch, 3, 32, 32)
            ok, err, tol = max_err_ok(fast(x), model(x))
            assert ok, f"batch {batch}: {err} > {tol}"
    assert len(fast.compiled) == 1
    with pytest.raises(KilnError, match=r"dim 0 \(batch\) is 9, outside the compiled range \[1, 8\]"):
        fast(torch.randn(9, 3, 32, 32))
    with pytest.raises(KilnError, match="expected rank 4"):
        fast(torch.randn(2, 3, 32))


def test_lstm_batch_and_sequence_length():
    model, inputs = models.lstm(batch=4, seq=16)
    fast = kiln.compile(model, inputs, dynamic={0: {0: "batch", 1: "seq"}})
    with torch.no_grad():
        for batch, seq in [(1, 5), (7, 16), (3, 31), (1, 1)]:
            x = torch.randn(batch, seq, 8)
            ok, err, tol = max_err_ok(fast(x), model(x))
            assert ok, f"{batch}x{seq}: {err} > {tol}"
    assert len(fast.compiled) == 1


def test_dynamic_recurrent_layers_run_kilns_own_kernels():
    # the C++ layers read the time and batch sizes per call: a dynamic plan takes them
    # (before, a symbolic LSTM ran torch's reference op)
    model, inputs = models.lstm(batch=4, seq=16)
    fast = kiln.compile(model, inputs, dynamic={0: {0: "batch", 1: "seq"}})
    with torch.no_grad():
        x = torch.randn(3, 9, 8)
        ok, err, tol = max_err_ok(fast(x), model(x))
    assert ok, f"{err} > {tol}"
    used = [k for label, k in fast.compiled[0].report.node_kernels if label.startswith("lstm")]
    assert len(used) == 2
    if kiln._C.recurrence_supported():
        assert not any("reference" in k for k in used), used


def test_a_later_specialization_may_trace_a_call_of_batch_one():
    # dynamic=True varies the batch only; a new sequence length is a new specialization,
    # traced on the call that needs it, whose batch may be 1 (torch.export fixes a dim of 1:
    # the call's own sizes, not the first example's, decide the widening)
    model, inputs = models.lstm(batch=4, seq=16)
    fast = kiln.compile(model, inputs, dynamic=True)
    with torch.no_grad():
        for batch, seq in [(4, 16), (1, 5), (3, 5)]:
            x = torch.randn(batch, seq, 8)
            ok, err, tol = max_err_ok(fast(x), model(x))
            assert ok, f"{batch}x{seq}: {err} > {tol}"
    assert sorted(c.report.input_shapes[0][1] for c in fast.compiled) == [5, 16]


def test_dynamic_option_is_checked_before_tracing():
    m = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with pytest.raises(KilnError, match="no input named 'y'; the inputs are input"):
        kiln.compile(m, (x,), dynamic={"y": {0: "batch"}})
    with pytest.raises(KilnError, match="has 2 dims, no axis 2"):
        kiln.compile(m, (x,), dynamic={0: {2: "batch"}})
    with pytest.raises(KilnError, match="range must be 1 <= min <= max"):
        kiln.compile(m, (x,), dynamic={0: {0: ("batch", 4, 2)}})
    with pytest.raises(KilnError, match="outside batch's range"):
        kiln.compile(m, (x,), dynamic={0: {0: ("batch", 4, 8)}})


@pytest.mark.parametrize("options,rel", [({"precision": "bf16"}, 3e-2), ({"quantize": "int8-dynamic"}, 2e-2)])
def test_reduced_precision_plans_are_dynamic_too(options, rel):
    model, inputs = models.bert(layers=2, hidden=64, heads=4, ffn=128, vocab=100)
    fast = kiln.compile(model, inputs, dynamic=True, **options)
    with torch.no_grad():
        for batch, seq in [(1, 9), (3, 40)]:
            args = _tokens(batch, seq, inputs[1])
            ok, err, tol = max_err_ok(fast(*args), model(*args), rel=rel)
            assert ok, f"{options} {batch}x{seq}: {err} > {tol}"
    assert len(fast.compiled) == 1


@pytest.mark.parametrize("name", ["hf_bert"])
def test_a_dynamic_model_saves_and_loads_with_its_ranges(tmp_path, name):
    model, inputs = getattr(models, name)(layers=1, hidden=32, heads=2, ffn=64, vocab=100)
    fast = kiln.compile(model, inputs, dynamic={"input_ids": {0: "batch", 1: ("seq", 1, 200)},
                                                "attention_mask": {0: "batch", 1: "seq"}})
    kiln.save(fast, tmp_path / "m.kiln")
    loaded = kiln.load(tmp_path / "m.kiln")
    assert loaded.compiled[0].graph.inputs[0].type.shape == (Sym("batch"), Sym("seq"))
    with torch.no_grad():
        for batch, seq in [(1, 1), (3, 7), (2, 129), (1, 200)]:
            args = _tokens(batch, seq, inputs[1])
            assert torch.equal(_logits(loaded(*args)), _logits(fast(*args))), (batch, seq)
            ok, err, tol = max_err_ok(_logits(loaded(*args)), _logits(model(*args)))
            assert ok, f"{batch}x{seq}: {err} > {tol}"
    assert len(loaded.compiled) == 1  # the one saved plan serves them all
    with pytest.raises(KilnError, match=r"input 'input_ids' dim 1 \(seq\) is 201, outside the compiled range \[1, 200\]"):
        loaded(*_tokens(1, 201, inputs[1]))


def test_a_bare_dim_name_takes_the_range_given_with_it_elsewhere():
    from kiln.options import DynamicDim, parse_dynamic

    dims = parse_dynamic({"ids": {1: ("seq", 1, 64)}, "mask": {1: "seq"}, 2: {0: "batch"}})
    assert dims == (DynamicDim("ids", 1, "seq", 1, 64), DynamicDim("mask", 1, "seq", 1, 64),
                    DynamicDim(2, 0, "batch", 1, None))
    with pytest.raises(KilnError, match="seq is given two ranges"):
        parse_dynamic({"ids": {1: ("seq", 1, 64)}, "mask": {1: ("seq", 2, 64)}})


def test_a_dim_the_model_fixes_is_refused_and_a_wider_range_is_narrowed_to_the_models():
    class FixedLength(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = torch.nn.Embedding(50, 8), torch.nn.Parameter(torch.randn(16, 8))

        def forward(self, ids):
            return self.emb(ids) + self.pos  # the sequence must be 16 long

    with pytest.raises(KilnError, match=r"input 'ids' dim 1 \(seq\) cannot vary: the model fixes it to 16"):
        kiln.compile(FixedLength(), (torch.randint(0, 50, (2, 16)),), dynamic=True)

    class EvenLength(torch.nn.Module):
        def forward(self, x):  # only even lengths reshape: torch traces it without a guard
            b, s, d = x.shape
            return x.reshape(b, s // 2, 2 * d).sum(-1)

    with pytest.raises(KilnError, match="the model constrains the dims it was asked to vary"):
        kiln.compile(EvenLength(), (torch.randn(2, 8, 4),), dynamic={0: {1: "seq"}})
    model, inputs = models.hf_bert(layers=1, hidden=32, heads=2, ffn=64, vocab=100)
    fast = kiln.compile(model, inputs, dynamic={"input_ids": {0: "batch", 1: ("seq", 1, 1000)},
                                                "attention_mask": {0: "batch", 1: "seq"}})
    with pytest.raises(KilnError, match=r"\(seq\) is 600, outside the compiled range \[1, 512\]"):
        fast(*_tokens(1, 600, inputs[1]))

"""The import cache: a second compile of the same model skips torch.export, binds the new
model's weights, and never trusts an entry whose graph does not reproduce the model."""
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import kiln
from kiln import import_cache
from kiln.frontends import torch_export


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))

CONFIG = {"scale": 2.0}  # read inside forward: a global the fingerprint cannot see


class Net(nn.Module):
    def __init__(self, act="relu"):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.act = act

    def forward(self, x):
        y = self.fc(x) * CONFIG["scale"]
        return torch.relu(y) if self.act == "relu" else torch.tanh(y)


def _count_exports(monkeypatch):
    calls = []
    real = torch_export.export_program

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch_export, "export_program", counting)
    return calls


def test_second_compile_skips_export_and_binds_the_new_weights(monkeypatch):
    calls = _count_exports(monkeypatch)
    x = torch.randn(3, 8)
    torch.manual_seed(0)
    kiln.compile(Net(), (x,))
    other = Net()  # same code and shapes, different weights
    fast = kiln.compile(other, (x,))
    assert len(calls) == 1
    torch.testing.assert_close(fast(x), other(x))


def test_dynamic_compile_hits_with_its_ranges_and_is_not_the_static_entry(monkeypatch):
    """A dynamic= import is its own entry (the static one of the same model and inputs is not
    used for it), and a hit keeps the range the model's trace narrowed (the position table)."""
    calls = _count_exports(monkeypatch)
    model, inputs = kiln.models.hf_bert(layers=1, hidden=32, heads=2, ffn=64, vocab=100)
    kiln.compile(model, inputs)
    kiln.compile(model, inputs, dynamic=True)
    assert len(calls) == 2
    torch.manual_seed(1)
    other, _ = kiln.models.hf_bert(layers=1, hidden=32, heads=2, ffn=64, vocab=100)
    fast = kiln.compile(other, inputs, dynamic=True)
    assert len(calls) == 2
    ids, mask = torch.randint(0, 100, (3, 11)), torch.ones(3, 11, dtype=inputs[1].dtype)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, mask).logits, other(ids, mask).logits)
    with pytest.raises(kiln.KilnError, match=r"dim 1 \(seq\) is 513, outside the compiled range \[1, 512\]"):
        fast(torch.randint(0, 100, (1, 513)), torch.ones(1, 513, dtype=inputs[1].dtype))


def test_an_attribute_change_is_a_new_key(monkeypatch):
    calls = _count_exports(monkeypatch)
    x = torch.randn(3, 8)
    kiln.compile(Net("relu"), (x,))
    tanh = Net("tanh")
    fast = kiln.compile(tanh, (x,))
    assert len(calls) == 2
    torch.testing.assert_close(fast(x), tanh(x))
    assert import_cache.fingerprint(Net("relu"), (x,), {}) != import_cache.fingerprint(tanh, (x,), {})
    assert import_cache.fingerprint(Net(), (x,), {}) != import_cache.fingerprint(Net(), (torch.randn(2, 8),), {})


def test_an_entry_that_no_longer_reproduces_the_model_is_not_trusted(monkeypatch):
    calls = _count_exports(monkeypatch)
    x = torch.randn(3, 8)
    model = Net()
    kiln.compile(model, (x,))
    monkeypatch.setitem(CONFIG, "scale", -1.0)  # same fingerprint, different function
    fast = kiln.compile(model, (x,))
    assert len(calls) == 2  # verification failed, exported again
    torch.testing.assert_close(fast(x), model(x))


def test_the_check_runs_the_model_on_the_callers_thread(monkeypatch):
    # the cached graph runs on a helper thread; the model itself on the caller's, so its
    # thread-local modes are the caller's
    seen = []

    class Probe(Net):
        def forward(self, x):
            seen.append(threading.current_thread() is threading.main_thread())
            return super().forward(x)

    calls = _count_exports(monkeypatch)
    x = torch.randn(3, 8)
    kiln.compile(Probe(), (x,))
    seen.clear()
    fast = kiln.compile(Probe(), (x,))
    assert len(calls) == 1 and seen == [True]
    assert fast.report.import_cache_hit


def test_a_model_in_training_mode_runs_after_the_graph(monkeypatch):
    # its call may update buffers the graph reads (batch norm statistics): no overlap
    overlapped = []

    class Probe(Net):
        def forward(self, x):
            overlapped.append(any(t.name == "kiln-import-check" for t in threading.enumerate()))
            return super().forward(x)

    calls = _count_exports(monkeypatch)
    x = torch.randn(3, 8)
    kiln.compile(Probe().train(), (x,))
    overlapped.clear()
    assert kiln.compile(Probe().train(), (x,)).report.import_cache_hit
    assert len(calls) == 1 and overlapped == [False]


def test_a_cached_graph_that_cannot_run_is_not_trusted(monkeypatch):
    calls = _count_exports(monkeypatch)
    x = torch.randn(3, 8)
    model = Net()
    kiln.compile(model, (x,))

    def broken(*a, **k):
        raise RuntimeError("the helper thread's run fails")

    monkeypatch.setattr(import_cache, "build_plan", broken)
    fast = kiln.compile(model, (x,))
    assert len(calls) == 2 and not fast.report.import_cache_hit  # exported again
    torch.testing.assert_close(fast(x), model(x))


def _scaling_hook(factor):
    def hook(m, i, o):
        return o * factor
    return hook


class _Scaler:
    def __call__(self, m, i, o):
        return o * 2


def test_hooks_are_part_of_the_key():
    x = torch.randn(3, 8)
    plain = import_cache.fingerprint(Net(), (x,), {})

    def key(*hooks, kwargs=False):
        m = Net()
        for h in hooks:
            m.fc.register_forward_hook(h, with_kwargs=kwargs)
        return import_cache.fingerprint(m, (x,), {})

    doubled = key(_scaling_hook(2.0))
    assert doubled is not None and doubled != plain
    assert doubled == key(_scaling_hook(2.0))  # the same hook in another model: the same key
    assert doubled != key(_scaling_hook(3.0))  # the value it closes over
    assert key(lambda m, i, o: o * 2) != key(lambda m, i, o: o * 3)  # same file and name, other code
    assert key(_scaling_hook(2.0), _scaling_hook(3.0)) != key(_scaling_hook(3.0), _scaling_hook(2.0))  # order
    assert key(lambda m, i, k, o: o, kwargs=True) != key(lambda m, i, k, o: o)  # calling flags count too
    pre = Net()
    pre.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    assert import_cache.fingerprint(pre, (x,), {}) not in (None, plain)


def test_a_hooked_model_hits_only_with_the_same_hook(monkeypatch):
    calls = _count_exports(monkeypatch)
    x = torch.randn(3, 8)
    for factor, exports in ((2.0, 1), (2.0, 1), (-1.0, 2)):
        m = Net()
        m.register_forward_hook(_scaling_hook(factor))
        fast = kiln.compile(m, (x,))
        assert len(calls) == exports
        torch.testing.assert_close(fast(x), m(x))


def test_models_with_opaque_hooks_or_unstable_attributes_are_not_cached():
    x = torch.randn(3, 8)
    hooked = Net()
    hooked.register_forward_hook(_Scaler())  # a callable object: its state has no description
    assert import_cache.fingerprint(hooked, (x,), {}) is None
    captured = Net()
    captured.register_forward_hook(_scaling_hook(object()))  # closes over an object known by address only
    assert import_cache.fingerprint(captured, (x,), {}) is None

    def unassigned():
        def hook(m, i, o):
            return o * later
        pending = Net()
        pending.register_forward_hook(hook)  # ``later`` is not assigned yet
        key = import_cache.fingerprint(pending, (x,), {})
        later = 2.0
        return key
    assert unassigned() is None
    odd = Net()
    odd.helper = object()  # described only by its address
    assert import_cache.fingerprint(odd, (x,), {}) is None


def test_new_process_compiles_without_torch_export(tmp_path):
    code = """
import sys, torch, kiln
m, i = kiln.models.lstm(seq=8, batch=2)
f = kiln.compile(m, i)
torch.testing.assert_close(f(*i), m(*i))
print("ok", "torch.export._trace" in sys.modules, "kiln.frontends.torch_export" in sys.modules)
"""
    env = {"KILN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    cold = subprocess.run([sys.executable, "-c", code, "cold"], env=env, capture_output=True, text=True)
    assert cold.returncode == 0, cold.stderr[-2000:]
    warm = subprocess.run([sys.executable, "-c", code, "warm"], env=env, capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert cold.stdout.split() == ["ok", "True", "True"]
    # on a hit neither torch.export's machinery nor Kiln's exporter is even imported
    assert warm.stdout.split() == ["ok", "False", "False"]

"""Exported modules called through the TVM FFI's C ABI (codegen/tvm_capi.py) compute what
the tvm_ffi package's call computes, report TVM's errors, and serve several threads."""
import threading

import pytest
import torch
from torch import nn

import kiln
from kiln.codegen.tvm_capi import ExportedFunction
from kiln.codegen.tvm_runtime import GeneratedKernel


@pytest.fixture(scope="module")
def kernel():
    """A generated group kernel (LayerNorm over tanh(x) * s + 1) and inputs for its main."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.LayerNorm(32)).eval()
    with pytest.MonkeyPatch.context() as mp:
        # an agreeing generated kernel wins without timing: which one is faster is not this test's
        # business (a group this small may not be worth generating)
        mp.setenv("KILN_GROUP_CHOICE", "generated")
        mp.setenv("KILN_CACHE", "0")  # a cached plan may hold an earlier, measured choice
        compiled = kiln.compile(model, (torch.randn(4, 8),))
    steps = [s for s in compiled.compiled[0].plan.steps if isinstance(s.fn, GeneratedKernel)]
    assert steps, "the model must run a generated kernel"
    k = steps[0].fn
    assert isinstance(k.func, ExportedFunction)
    ins = [torch.randn(v.type.shape).to(v.type.dtype.to_torch()) for v in k.group.inputs]
    return k, ins


def _outs(k):
    return [torch.empty(s, dtype=d) for s, d, _ in k.outs]


def test_same_results_as_the_tvm_ffi_package(kernel):
    tvm_ffi = pytest.importorskip("tvm_ffi")
    k, ins = kernel
    a, b = _outs(k), _outs(k)
    k.func(*ins, *a)
    tvm_ffi.load_module(k.func.path)["main"](*ins, *b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_errors_name_the_argument(kernel):
    k, ins = kernel
    bad = torch.randn(*ins[0].shape[:-1], ins[0].shape[-1] + 1)
    with pytest.raises(RuntimeError, match="shape"):
        k.func(bad, *ins[1:], *_outs(k))
    with pytest.raises(ValueError, match="contiguous"):
        k.func(torch.randn(ins[0].shape[-1], *ins[0].shape[:-1]).transpose(0, -1), *ins[1:], *_outs(k))
    ref = _outs(k)
    k.func(*ins, *ref)  # the function still works after a failed call
    again = _outs(k)
    k.func(*ins, *again)
    assert all(torch.equal(x, y) for x, y in zip(ref, again))


def test_threads_call_it_at_once(kernel):
    k, ins = kernel
    inputs = [[t * (i + 1) for t in ins] for i in range(4)]
    expected = []
    for x in inputs:
        o = _outs(k)
        k.func(*x, *o)
        expected.append(o)
    got = [None] * len(inputs)

    def work(i):
        for _ in range(50):
            o = _outs(k)
            k.func(*inputs[i], *o)
        got[i] = o

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, e in zip(got, expected):
        assert all(torch.equal(x, y) for x, y in zip(g, e))

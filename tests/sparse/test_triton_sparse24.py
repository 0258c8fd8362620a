"""The Triton 2:4 kernel: run in Triton's interpreter against torch, and compiled to cubin.

Both run in a fresh interpreter: TRITON_INTERPRET is read when a kernel is defined, and a
cubin compile needs the kernel defined without it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

INTERPRET = textwrap.dedent("""
    import torch
    from kiln.ir import sparse as S
    from kiln.kernels.triton_sparse24 import sparse24_linear
    from kiln.pruning import weight_mask
    torch.manual_seed(0)
    cases = [(5, 7, 12, "relu", True, 16), (33, 40, 64, "none", False, 32), (1, 3, 4, "gelu_tanh", True, 16),
             (17, 16, 100, "relu", True, 32)]
    for m, n, k, act, bias, bk in cases:
        w = torch.randn(n, k)
        w = w * weight_mask(w, 0.5, "2:4")
        e = S.encode(w, S.SPARSE_24)
        x, b = torch.randn(m, k), torch.randn(n)
        y = sparse24_linear(x, e.values, e.indices, b if bias else None, act, 16, 16, bk)
        ref = x @ w.t() + (b if bias else 0)
        ref = {"relu": torch.relu, "none": lambda t: t,
               "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[act](ref)
        err = (y - ref).abs().max().item()
        assert err <= 1e-4 * max(1.0, ref.abs().max().item()), (m, n, k, act, err)
    print("ok", len(cases))
""")

COMPILE = textwrap.dedent("""
    from kiln.kernels.triton_sparse24 import compile_cubin
    for sm in (80, 90):
        for dtype in ("fp16", "bf16"):
            cubin = compile_cubin(sm, dtype)
            assert cubin[:4] == b"\\x7fELF", (sm, dtype)
    print("ok")
""")


def _run(code: str, **env) -> str:
    e = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1", **env)
    e.pop("TRITON_INTERPRET", None) if "TRITON_INTERPRET" not in env else None
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_sparse24_kernel_in_the_interpreter_matches_torch():
    assert _run(INTERPRET, TRITON_INTERPRET="1").startswith("ok")


def test_sparse24_kernel_compiles_to_cubin_for_sm80_and_sm90():
    assert _run(COMPILE).startswith("ok")

"""One serial call of every torch op that runs on MKL's vector math library (VML), before any
parallel one.

torch computes contiguous float32/float64 ``tanh``, ``exp``, ``erf``, ``sqrt``, ... with VML,
each intra-op thread calling it on its chunk. oneMKL picks each VML function's kernel (ISA
and accuracy) on that function's first call; when the first call of a function runs on
several threads at once, one thread can run a low-accuracy kernel for its whole chunk of
that call (pytorch/pytorch#188792, open, oneMKL 2024.2 as the torch wheels bundle it). On
these machines a fresh process's first parallel ``torch.tanh`` over 32x256 floats returned
values 5e-5 off in about one process in ten: a plan's first call, or the reference a
compiled kernel is checked against, was silently less accurate than every later call.

A call on one element runs on the calling thread alone and settles the dispatch for the
process; ``resolve_vml_dispatch`` makes one per function and precision, once per process,
before Kiln measures or runs a kernel (``kernels.choice``, ``runtime.plan.Plan``).
"""
from __future__ import annotations

import threading

import torch

# The functions ATen routes to VML (aten/src/ATen/cpu/vml.h, IMPLEMENT_VML_MKL), as the torch
# ops that reach them; float and double each have their own VML function.
VML_OPS = (torch.acos, torch.asin, torch.atan, torch.cos, torch.erf, torch.erfc, torch.erfinv, torch.exp,
           torch.log, torch.log10, torch.log2, torch.sin, torch.sqrt, torch.tan, torch.tanh, torch.trunc)
VML_DTYPES = (torch.float32, torch.float64)

_done = False
_lock = threading.Lock()


def resolve_vml_dispatch() -> bool:
    """Settle VML's kernel choice for every function torch calls it for (once per process;
    True on the call that did it)."""
    global _done
    if _done:
        return False
    with _lock:
        if _done:
            return False
        with torch.no_grad():
            for dt in VML_DTYPES:
                x = torch.full((1,), 0.5, dtype=dt)  # inside every function's domain
                for op in VML_OPS:
                    op(x)
        _done = True
    return True

"""Row kernels: layer norm and softmax over the last axis, one program per row.

The whole row lives in registers (BLOCK = next power of two >= row length), so each
element is read once and written once; rows longer than ``MAX_ROW`` take the generated
or reference path instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.autotune import space

from .launch import launch
from .tuning import choose_config, launch_params, signature_of

MAX_ROW = 16384


@space(num_warps=[4, 1, 2, 8])
@triton.jit
def layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, s_xr, s_yr, eps,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(x_ptr + row * s_xr + cols, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / N
    d = tl.where(m, x - mean, 0.0)
    var = tl.sum(d * d, 0) / N
    y = d * (1.0 / tl.sqrt(var + eps))
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=m, other=1.0)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=m, other=0.0)
    tl.store(y_ptr + row * s_yr + cols, y.to(y_ptr.dtype.element_ty), mask=m)


@space(num_warps=[4, 1, 2, 8])
@triton.jit
def softmax_kernel(x_ptr, y_ptr, N, s_xr, s_yr, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(x_ptr + row * s_xr + cols, mask=m, other=float("-inf")).to(tl.float32)
    mx = tl.max(x, 0)
    e = tl.exp(x - mx)
    s = tl.sum(e, 0)
    y = (x - mx) - tl.log(s) if LOG else e / s
    tl.store(y_ptr + row * s_yr + cols, y.to(y_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(-1, n) if x.is_contiguous() else x.contiguous().reshape(-1, n)


def layer_norm(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-5, normalized_ndim: int = 1) -> torch.Tensor:
    n = 1
    for d in x.shape[x.dim() - normalized_ndim:]:
        n *= d
    x2 = _rows(x, n)
    y = torch.empty_like(x2)
    sig = signature_of(x2, weight is not None, bias is not None)

    def run(cfg):
        meta, warps, _ = launch_params(cfg)
        launch(layer_norm_kernel, (x2.shape[0],),
               (x2, weight if weight is not None else x2, bias if bias is not None else x2, y, n,
                x2.stride(0), y.stride(0), float(eps)),
               dict(HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=triton.next_power_of_2(n), **meta),
               warps, 1)

    run(choose_config("triton.layer_norm", layer_norm_kernel.tune_space, sig, run, x))
    return y.reshape(x.shape)


def softmax(x: torch.Tensor, log: bool = False) -> torch.Tensor:
    """(log-)softmax over the last axis."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    y = torch.empty_like(x2)
    sig = signature_of(x2, log)

    def run(cfg):
        meta, warps, _ = launch_params(cfg)
        launch(softmax_kernel, (x2.shape[0],), (x2, y, n, x2.stride(0), y.stride(0)),
               dict(LOG=bool(log), BLOCK=triton.next_power_of_2(n), **meta), warps, 1)

    run(choose_config("triton.softmax", softmax_kernel.tune_space, sig, run, x))
    return y.reshape(x.shape)

"""Convolution as an implicit GEMM, and 2-D pooling.

conv2d: rows are output pixels (n, oh, ow), columns output channels, the reduction runs
over (c, kh, kw); input patches are gathered on the fly (no im2col buffer) through the
input's strides, so NCHW and channels-last activations both work unchanged. The epilogue
(bias, residual, activation) is the GEMM's. Groups run as a grid axis.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from kiln.codegen.autotune import space
from kiln.ir.attrs import Activation

from .gemm import ACT_CODES, activate, dot_precision
from .launch import launch
from .tuning import choose_config, launch_params, signature_of


@space(BLOCK_M=[64, 32, 128], BLOCK_N=[64, 32, 128], BLOCK_K=[32, 16, 64], num_warps=[4, 8], num_stages=[2, 3])
@triton.jit
def conv2d_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr,
                  C, H, W, OH, OW, M, CO_G, KG,
                  s_xn, s_xc, s_xh, s_xw, s_wo, s_yn, s_yc, s_yh, s_yw, s_rn, s_rc, s_rh, s_rw,
                  KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel within the group
    ow = rm % OW
    oh = (rm // OW) % OH
    nb = rm // (OW * OH)
    co = grp * CO_G + rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KG, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # (c within group, kh, kw)
        kw = rk % KW
        kh = (rk // KW) % KH
        c = grp * (KG // (KH * KW)) + rk // (KH * KW)
        ih = oh[:, None] * SH - PH + kh[None, :] * DH
        iw = ow[:, None] * SW - PW + kw[None, :] * DW
        amask = (rm[:, None] < M) & (rk[None, :] < KG) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + nb[:, None] * s_xn + c[None, :] * s_xc + ih * s_xh + iw * s_xw, mask=amask, other=0.0)
        b = tl.load(w_ptr + co[None, :] * s_wo + rk[:, None], mask=(rk[:, None] < KG) & (rn[None, :] < CO_G),
                    other=0.0)
        acc += tl.dot(a, b, input_precision=PREC)
    cmask = (rm[:, None] < M) & (rn[None, :] < CO_G)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=rn < CO_G, other=0.0)[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + nb[:, None] * s_rn + co[None, :] * s_rc + oh[:, None] * s_rh + ow[:, None] * s_rw,
                       mask=cmask, other=0.0)
    acc = activate(acc, ACT)
    tl.store(y_ptr + nb[:, None] * s_yn + co[None, :] * s_yc + oh[:, None] * s_yh + ow[:, None] * s_yw,
             acc.to(y_ptr.dtype.element_ty), mask=cmask)


_WEIGHT_MATRICES: dict[int, tuple] = {}  # id(weight) -> (weakref to weight, matrix)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a contiguous [C_out, C_in/g * KH * KW] matrix in logical (c, kh, kw)
    order. A channels-last weight needs a copy for that; it is made once per weight tensor
    (weights are the plan's constants) rather than on every call."""
    co = weight.shape[0]
    if weight.is_contiguous():
        return weight.reshape(co, -1)
    entry = _WEIGHT_MATRICES.get(id(weight))
    if entry is not None and entry[0]() is weight:
        return entry[1]
    mat = weight.reshape(co, -1).contiguous()
    key = id(weight)
    _WEIGHT_MATRICES[key] = (weakref.ref(weight, lambda _: _WEIGHT_MATRICES.pop(key, None)), mat)
    return mat


def _out(size, k, s, p, d, ceil=False):
    span = size + 2 * p - d * (k - 1) - 1
    o = (-(-span // s) if ceil else span // s) + 1
    if ceil and (o - 1) * s >= size + p:
        o -= 1
    return o


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias=None, residual=None, stride=(1, 1), padding=(0, 0),
           dilation=(1, 1), groups: int = 1, activation: Activation = Activation.NONE,
           channels_last: bool | None = None) -> torch.Tensor:
    n, c, h, w = x.shape
    co, cg, kh, kw = weight.shape
    oh = _out(h, kh, stride[0], padding[0], dilation[0])
    ow = _out(w, kw, stride[1], padding[1], dilation[1])
    if channels_last is None:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and c > 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty((n, co, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    w2 = _weight_matrix(weight)
    r = residual
    rs = r.stride() if r is not None else (0, 0, 0, 0)
    m = n * oh * ow
    sig = signature_of(x, weight, stride, padding, dilation, groups, bias is not None, r is not None,
                       activation.value, channels_last)
    prec = dot_precision()

    def run(cfg):
        meta, warps, stages = launch_params(cfg)
        grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(co // groups, meta["BLOCK_N"]), groups)
        launch(conv2d_kernel, grid,
               (x, w2, bias if bias is not None else w2, r if r is not None else y, y, c, h, w, oh, ow, m,
                co // groups, cg * kh * kw, *x.stride(), w2.stride(0), *y.stride(), *rs),
               dict(KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0],
                    DW=dilation[1], HAS_BIAS=bias is not None, HAS_RES=r is not None, ACT=ACT_CODES[activation],
                    PREC=prec, **meta), warps, stages)

    run(choose_config("triton.conv2d", conv2d_kernel.tune_space, sig, run, x))
    return y


@space(BLOCK=[256, 128, 512, 1024], num_warps=[4, 2, 8])
@triton.jit
def pool2d_kernel(x_ptr, y_ptr, total, C, H, W, OH, OW, s_xn, s_xc, s_xh, s_xw, s_yn, s_yc, s_yh, s_yw,
                  KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  IS_MAX: tl.constexpr, COUNT_PAD: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    ow = idx % OW
    oh = (idx // OW) % OH
    c = (idx // (OW * OH)) % C
    nb = idx // (OW * OH * C)
    if IS_MAX:
        acc = tl.full((BLOCK,), float("-inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
    cnt = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            ih = oh * SH - PH + i * DH
            iw = ow * SW - PW + j * DW
            ok = live & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + nb * s_xn + c * s_xc + ih * s_xh + iw * s_xw, mask=ok, other=float("-inf"))
            if IS_MAX:
                acc = tl.maximum(acc, v)
            else:
                acc += tl.where(ok, v, 0.0)
                cnt += tl.where(ok, 1.0, 0.0)
    if not IS_MAX:
        if COUNT_PAD:  # the window clipped to the padded input, as torch counts it
            h0 = oh * SH - PH
            w0 = ow * SW - PW
            hh = tl.minimum(h0 + KH, H + PH) - h0
            ww = tl.minimum(w0 + KW, W + PW) - w0
            acc = acc / (hh * ww).to(tl.float32)
        else:
            acc = acc / cnt
    tl.store(y_ptr + nb * s_yn + c * s_yc + oh * s_yh + ow * s_yw, acc.to(y_ptr.dtype.element_ty), mask=live)


def pool2d(x: torch.Tensor, kernel, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False,
           is_max: bool = True, count_include_pad: bool = True) -> torch.Tensor:
    n, c, h, w = x.shape
    oh = _out(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = _out(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 else torch.contiguous_format
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    total = n * c * oh * ow
    sig = signature_of(x, kernel, stride, padding, dilation, ceil_mode, is_max, count_include_pad)

    def run(cfg):
        meta, warps, _ = launch_params(cfg)
        launch(pool2d_kernel, (triton.cdiv(total, meta["BLOCK"]),),
               (x, y, total, c, h, w, oh, ow, *x.stride(), *y.stride()),
               dict(KH=kernel[0], KW=kernel[1], SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
                    DH=dilation[0], DW=dilation[1], IS_MAX=bool(is_max), COUNT_PAD=bool(count_include_pad), **meta),
               warps, 1)

    run(choose_config("triton.pool2d", pool2d_kernel.tune_space, sig, run, x))
    return y

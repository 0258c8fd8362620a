"""GEMM kernels: (batched) GEMM with a fused epilogue, int8 and int4 weight-only GEMM.

Every operand is addressed through its strides, so a linear layer's [N, K] weight, a
transposed or broadcast batch operand and channels-last activations need no copy. The
epilogue is ``act(a @ b + bias + residual)`` (kiln.ir.reference.epilogue), computed
on the accumulator tile before the one store. Activations are ``ACT`` codes (``ACT_CODES``).
The weight-only int8 / int4 kernels read weights in Kiln's quantized format as the passes
store them (``kiln.ir.qformat``: int8 [N, K] with per-channel scales; int4 packed two per
byte with group scales [N, K // G]), decoding the nibbles in the kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.autotune import space
from kiln.ir import qformat
from kiln.ir.attrs import Activation

from .launch import launch
from .tuning import choose_config, launch_params, signature_of

ACT_CODES = {Activation.NONE: 0, Activation.RELU: 1, Activation.GELU: 2, Activation.GELU_TANH: 3,
             Activation.TANH: 4, Activation.SIGMOID: 5, Activation.SILU: 6, Activation.RELU6: 7}


@triton.jit
def activate(acc, ACT: tl.constexpr):
    """The fused activation ``ACT`` (``ACT_CODES``; 0: none) on an fp32 tile; tanh as
    2 sigmoid(2x) - 1 (no tanh in tl)."""
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 3:
        acc = 0.5 * acc * (1.0 + (2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)) - 1.0))
    elif ACT == 4:
        acc = 2.0 * tl.sigmoid(2.0 * acc) - 1.0
    elif ACT == 5:
        acc = tl.sigmoid(acc)
    elif ACT == 6:
        acc = acc * tl.sigmoid(acc)
    elif ACT == 7:
        acc = tl.minimum(tl.maximum(acc, 0.0), 6.0)
    return acc


def _fits(cfg: dict) -> bool:
    return cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 128 * 128


@space(_fits, BLOCK_M=[64, 32, 128], BLOCK_N=[64, 32, 128], BLOCK_K=[32, 16, 64], num_warps=[4, 8],
       num_stages=[2, 3, 4])
@triton.jit
def gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, M, N, K,
                s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn, s_rb, s_rm, s_rn,
                HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + batch * s_ab
    b_base = b_ptr + batch * s_bb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_base + rm[:, None] * s_am + kk[None, :] * s_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_base + kk[:, None] * s_bk + rn[None, :] * s_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=PREC)
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + batch * s_rb + rm[:, None] * s_rm + rn[None, :] * s_rn, mask=cmask, other=0.0)
    acc = activate(acc, ACT)
    tl.store(c_ptr + batch * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn,
             acc.to(c_ptr.dtype.element_ty), mask=cmask)


def dot_precision() -> str:
    # fp32 GEMMs match torch: TF32 only where the user allowed it for torch too
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _gemm3(a: torch.Tensor, b: torch.Tensor, bias, residual, activation: Activation, out_dtype) -> torch.Tensor:
    """a [B, M, K] @ b [B, K, N] (any strides; B may broadcast with stride 0)."""
    bsz, m, k = a.shape
    n = b.shape[2]
    c = torch.empty((bsz, m, n), dtype=out_dtype, device=a.device)
    dummy = c
    res = residual if residual is not None else dummy
    sig = signature_of(a, b, bias is not None, residual is not None, activation.value)
    prec = dot_precision()

    def run(cfg):
        meta, warps, stages = launch_params(cfg)
        grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), bsz)
        launch(gemm_kernel, grid,
               (a, b, c, bias if bias is not None else dummy, res, m, n, k,
                a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
                c.stride(0), c.stride(1), c.stride(2), res.stride(0) if residual is not None else 0,
                res.stride(1) if residual is not None else 0, res.stride(2) if residual is not None else 0),
               dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=ACT_CODES[activation],
                    PREC=prec, **meta), warps, stages)

    cfg = choose_config("triton.gemm", gemm_kernel.tune_space, sig, run, a)
    run(cfg)
    return c


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, residual=None,
           activation: Activation = Activation.NONE) -> torch.Tensor:
    """act(x @ weight^T + bias + residual) for x [..., K], weight [N, K] (torch's F.linear)."""
    lead = x.shape[:-1]
    x2 = x.reshape(1, -1, x.shape[-1])
    w3 = weight.t().unsqueeze(0)
    r3 = residual.reshape(1, -1, weight.shape[0]) if residual is not None else None
    return _gemm3(x2, w3, bias, r3, activation, x.dtype).reshape(*lead, weight.shape[0])


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul for operands of rank >= 2 (batch dims broadcast): the batched GEMM."""
    if a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b)  # vector cases: Kiln's IR keeps these as reference ops
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a_ = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:]) if batch else a.unsqueeze(0)
    b_ = b.expand(*batch, *b.shape[-2:])
    b_ = b_.reshape(-1, *b.shape[-2:]) if batch else b_.unsqueeze(0)
    out = _gemm3(a_, b_, None, None, Activation.NONE, torch.result_type(a, b))
    return out.reshape(*batch, a.shape[-2], b.shape[-1])


# ----------------------------------------------------------------------------- weight-only int8 / int4
@space(BLOCK_M=[32, 16, 64], BLOCK_N=[64, 32, 128], BLOCK_K=[32, 64], num_warps=[4, 8], num_stages=[3, 2])
@triton.jit
def int8_gemm_kernel(x_ptr, wq_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K, s_xm, s_xk, s_wn, s_wk, s_ym, s_yn,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * s_xm + kk[None, :] * s_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(wq_ptr + kk[:, None] * s_wk + rn[None, :] * s_wn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        acc += tl.dot(x, w.to(tl.float32), input_precision="ieee")
    acc = acc * tl.load(scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias=None) -> torch.Tensor:
    """x [..., K] fp32 @ (w_q [N, K] int8 * w_scale [N])^T + bias: weight-only int8."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w_q.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    sig = signature_of(x2, w_q, bias is not None)

    def run(cfg):
        meta, warps, stages = launch_params(cfg)
        grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        launch(int8_gemm_kernel, grid, (x2, w_q, w_scale, bias if bias is not None else w_scale, y, m, n, k,
                                        x2.stride(0), x2.stride(1), w_q.stride(0), w_q.stride(1),
                                        y.stride(0), y.stride(1)),
               dict(HAS_BIAS=bias is not None, **meta), warps, stages)

    run(choose_config("triton.int8_linear", int8_gemm_kernel.tune_space, sig, run, x))
    return y.reshape(*lead, n)


@space(BLOCK_M=[32, 16, 64], BLOCK_N=[64, 32, 128], BLOCK_K=[32, 64, 128], num_warps=[4, 8], num_stages=[3, 2])
@triton.jit
def int4_gemm_kernel(x_ptr, wp_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K, s_xm, s_xk, s_wn, s_sn, s_ym, s_yn,
                     GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides GROUP: one scale per column per block
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * s_xm + kk[None, :] * s_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        wmask = (kk[:, None] < K) & (rn[None, :] < N)
        byte = tl.load(wp_ptr + rn[None, :] * s_wn + (kk[:, None] // 2), mask=wmask, other=0).to(tl.int32)
        q = (byte >> ((kk[:, None] % 2) * 4)) & 0xF
        q = tl.where(q >= 8, q - 16, q)  # two's-complement nibble (qformat.unpack_int4)
        part = tl.dot(x, q.to(tl.float32), input_precision="ieee")
        s = tl.load(scale_ptr + rn * s_sn + k0 // GROUP, mask=rn < N, other=0.0)
        acc += part * s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def int4_linear(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                bias=None) -> torch.Tensor:
    """x [..., K] fp32 @ dequant(w_packed uint8 [N, K//2], scales [N, K//G])^T + bias."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w_packed.shape[0]
    packed_shape, scales_shape = qformat.int4_shapes(n, k, group_size)
    if k % group_size or tuple(w_packed.shape) != packed_shape or tuple(scales.shape) != scales_shape:
        raise ValueError(f"int4 weight {tuple(w_packed.shape)} / scales {tuple(scales.shape)} do not fit "
                         f"K={k}, group {group_size}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    sig = signature_of(x2, w_packed, group_size, bias is not None)
    space_ = int4_gemm_kernel.tune_space.__class__.of(
        lambda c: group_size % c["BLOCK_K"] == 0, **dict(int4_gemm_kernel.tune_space.axes))

    def run(cfg):
        meta, warps, stages = launch_params(cfg)
        grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        launch(int4_gemm_kernel, grid, (x2, w_packed, scales, bias if bias is not None else scales, y, m, n, k,
                                        x2.stride(0), x2.stride(1), w_packed.stride(0), scales.stride(0),
                                        y.stride(0), y.stride(1)),
               dict(GROUP=group_size, HAS_BIAS=bias is not None, **meta), warps, stages)

    run(choose_config("triton.int4_linear", space_, sig, run, x))
    return y.reshape(*lead, n)


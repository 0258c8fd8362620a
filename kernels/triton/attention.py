"""Flash-style fused attention: softmax(q k^T * scale + mask) v in one pass over K/V blocks.

Online softmax (running max and sum per query row) keeps the score matrix out of memory.
The additive mask is addressed through its strides, so a [B, 1, 1, S] padding mask
broadcasts with stride 0; a boolean mask means "keep where True" as in torch's SDPA.
``CAUSAL`` masks keys after the query position (torch's top-left aligned ``is_causal``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kiln.codegen.autotune import space

from .launch import launch
from .tuning import choose_config, launch_params, signature_of


@space(BLOCK_M=[64, 32, 128], BLOCK_N=[64, 32, 128], num_warps=[4, 8], num_stages=[2, 3])
@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, H, SQ, SK, D, scale,
                     s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                     s_mb, s_mh, s_mm, s_mn, s_ob, s_oh, s_om, s_od,
                     MASK: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # MASK: 0 none, 1 additive float, 2 boolean keep-mask
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rm[:, None] * s_qm + rd[None, :] * s_qd,
                mask=(rm[:, None] < SQ) & (rd[None, :] < D), other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, SK, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (rn[:, None] < SK) & (rd[None, :] < D)
        k = tl.load(k_ptr + b * s_kb + h * s_kh + rn[:, None] * s_kn + rd[None, :] * s_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        valid = (rm[:, None] < SQ) & (rn[None, :] < SK)
        mptr = mask_ptr + b * s_mb + h * s_mh + rm[:, None] * s_mm + rn[None, :] * s_mn
        if MASK == 1:
            s += tl.load(mptr, mask=valid, other=0.0)
        if MASK == 2:
            keep = tl.load(mptr, mask=valid, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        if CAUSAL:
            s = tl.where(rn[None, :] <= rm[:, None], s, float("-inf"))
        s = tl.where(rn[None, :] < SK, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row so far
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * s_vb + h * s_vh + rn[:, None] * s_vn + rd[None, :] * s_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]  # a row masked everywhere gives NaN, as torch's SDPA does
    tl.store(o_ptr + b * s_ob + h * s_oh + rm[:, None] * s_om + rd[None, :] * s_od,
             out.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < SQ) & (rd[None, :] < D))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """q [B, H, Sq, D], k/v [B, H, Sk, D]; mask broadcastable to [B, H, Sq, Sk]."""
    bsz, heads, sq, d = q.shape
    sk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o = torch.empty((bsz, heads, sq, v.shape[3]), dtype=q.dtype, device=q.device)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(bsz, heads, sq, sk)  # stride 0 where it broadcasts
        kind = 2 if mask.dtype == torch.bool else 1
    else:
        kind = 0
    m = mask if mask is not None else q
    ms = mask.stride() if mask is not None else (0, 0, 0, 0)
    block_d = max(16, triton.next_power_of_2(d))
    from .gemm import dot_precision

    prec = dot_precision()
    sig = signature_of(q, k, v, m if mask is not None else None, causal)

    def run(cfg):
        meta, warps, stages = launch_params(cfg)
        grid = (triton.cdiv(sq, meta["BLOCK_M"]), bsz * heads)
        launch(attention_kernel, grid, (q, k, v, m, o, heads, sq, sk, d, scale, *q.stride(), *k.stride(),
                                        *v.stride(), *ms, *o.stride()),
               dict(MASK=kind, CAUSAL=bool(causal), PREC=prec, BLOCK_D=block_d, **meta), warps, stages)

    run(choose_config("triton.attention", attention_kernel.tune_space, sig, run, q))
    return o

"""LSTM/GRU recurrence: one fused kernel per time step (h @ w_hh^T, gates, state update).

Kiln hoists the input projection out of the recurrence (one GEMM over all steps), so a
step only multiplies the previous hidden state by w_hh and applies the cell. A program
owns a block of batch rows and hidden units and computes all gates for them, so the cell
update needs no second pass. The cell state is updated in place (each program reads and
writes only its own block); h is read from step t-1's output slice and written to t's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.autotune import space

from .gemm import dot_precision
from .launch import launch
from .tuning import choose_config, launch_params, signature_of


@space(BLOCK_B=[16, 32, 64], BLOCK_H=[32, 64, 16], BLOCK_K=[32, 64], num_warps=[4, 2, 8])
@triton.jit
def rnn_step_kernel(xp_ptr, h_ptr, c_ptr, w_ptr, b_ptr, y_ptr, B, HID, s_xb, s_hb, s_cb, s_wr, s_yb,
                    LSTM: tl.constexpr, HAS_B: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rj = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc0 = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc1 = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc2 = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc3 = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    jmask = rj < HID
    for k0 in range(0, HID, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rb[:, None] * s_hb + rk[None, :], mask=(rb[:, None] < B) & (rk[None, :] < HID), other=0.0)
        wmask = (rk[:, None] < HID) & jmask[None, :]
        wp = w_ptr + rk[:, None] + rj[None, :] * s_wr  # w_hh^T block for gate 0
        acc0 += tl.dot(h, tl.load(wp, mask=wmask, other=0.0), input_precision=PREC)
        acc1 += tl.dot(h, tl.load(wp + HID * s_wr, mask=wmask, other=0.0), input_precision=PREC)
        acc2 += tl.dot(h, tl.load(wp + 2 * HID * s_wr, mask=wmask, other=0.0), input_precision=PREC)
        if LSTM:
            acc3 += tl.dot(h, tl.load(wp + 3 * HID * s_wr, mask=wmask, other=0.0), input_precision=PREC)
    if HAS_B:
        acc0 += tl.load(b_ptr + rj, mask=jmask, other=0.0)[None, :]
        acc1 += tl.load(b_ptr + HID + rj, mask=jmask, other=0.0)[None, :]
        acc2 += tl.load(b_ptr + 2 * HID + rj, mask=jmask, other=0.0)[None, :]
        if LSTM:
            acc3 += tl.load(b_ptr + 3 * HID + rj, mask=jmask, other=0.0)[None, :]
    m2 = (rb[:, None] < B) & jmask[None, :]
    xrow = xp_ptr + rb[:, None] * s_xb + rj[None, :]
    x0 = tl.load(xrow, mask=m2, other=0.0)
    x1 = tl.load(xrow + HID, mask=m2, other=0.0)
    x2 = tl.load(xrow + 2 * HID, mask=m2, other=0.0)
    if LSTM:
        x3 = tl.load(xrow + 3 * HID, mask=m2, other=0.0)
        i = tl.sigmoid(x0 + acc0)
        f = tl.sigmoid(x1 + acc1)
        g = 2.0 * tl.sigmoid(2.0 * (x2 + acc2)) - 1.0
        o = tl.sigmoid(x3 + acc3)
        cp = c_ptr + rb[:, None] * s_cb + rj[None, :]
        c = f * tl.load(cp, mask=m2, other=0.0) + i * g
        tl.store(cp, c, mask=m2)
        hn = o * (2.0 * tl.sigmoid(2.0 * c) - 1.0)
    else:
        r = tl.sigmoid(x0 + acc0)
        z = tl.sigmoid(x1 + acc1)
        n = 2.0 * tl.sigmoid(2.0 * (x2 + r * acc2)) - 1.0
        hp = tl.load(h_ptr + rb[:, None] * s_hb + rj[None, :], mask=m2, other=0.0)
        hn = (1.0 - z) * n + z * hp
    tl.store(y_ptr + rb[:, None] * s_yb + rj[None, :], hn, mask=m2)


def rnn_hoisted(xp: torch.Tensor, h0: torch.Tensor, c0, w_hh: torch.Tensor, b_hh, batch_first: bool,
                lstm: bool):
    """The hoisted recurrence (kiln RNNAttrs.proj_hoisted): xp [T, B, G*H] (or [B, T, G*H]),
    h0/c0 [1, B, H]. Returns (y, h_n, c_n) for LSTM, (y, h_n) for GRU, as the reference does."""
    xs = xp.transpose(0, 1) if batch_first else xp  # [T, B, G*H] view
    steps, bsz, _ = xs.shape
    hid = w_hh.shape[1]
    y = torch.empty((bsz, steps, hid) if batch_first else (steps, bsz, hid), dtype=xp.dtype, device=xp.device)
    ys = y.transpose(0, 1) if batch_first else y
    c = c0[0].clone() if lstm else h0[0]
    h0_ = h0[0].contiguous()
    w = w_hh.contiguous()
    if xs.stride(2) != 1:
        xs = xs.contiguous()
    sig = signature_of(xs, w, b_hh is not None, lstm)
    prec = dot_precision()

    def step(cfg, t):
        meta, warps, _ = launch_params(cfg)
        h_prev = h0_ if t == 0 else ys[t - 1]
        grid = (triton.cdiv(bsz, meta["BLOCK_B"]), triton.cdiv(hid, meta["BLOCK_H"]))
        launch(rnn_step_kernel, grid, (xs[t], h_prev, c, w, b_hh if b_hh is not None else w, ys[t], bsz, hid,
                                       xs.stride(1), h_prev.stride(0), c.stride(0), w.stride(0), ys.stride(1)),
               dict(LSTM=bool(lstm), HAS_B=b_hh is not None, PREC=prec, **meta), warps, 1)

    def measure_run(cfg):  # one step from h0 on a scratch cell state: the step's cost
        nonlocal c
        saved = c
        c = c.clone() if lstm else c
        step(cfg, 0)
        c = saved

    cfg = choose_config("triton.rnn_step", rnn_step_kernel.tune_space, sig, measure_run, xp)
    for t in range(steps):
        step(cfg, t)
    h_n = ys[steps - 1].unsqueeze(0) if steps else h0
    return (y, h_n, c.unsqueeze(0)) if lstm else (y, h_n)

"""2:4 semi-structured sparse GEMM for the ``cuda`` target, in Triton.

y [M, N] = act(x [M, K] @ W^T + bias), with W [N, K] stored as Kiln's 2:4 encoding
(``kiln.ir.sparse``): values [N, K/2] (the two kept weights of every group of four) and
int8 positions [N, K/2] (0..3, where in its group each kept weight sits).

Each program computes a BLOCK_M x BLOCK_N tile. Per BLOCK_K step it loads the compressed
weight tile once, expands it in registers to dense [BLOCK_N, BLOCK_K] (a weight lands at
its position, zeros elsewhere) and feeds ``tl.dot``, so the tensor cores run a dense MMA.
What the format saves is weight traffic: half the values plus one byte of position per
kept weight (fp16: 1.5 bytes per dense weight instead of 2), which is what bounds
inference GEMMs with few tokens. (The sparse MMA instructions of sm_80+ are not exposed
by Triton's language; a CUDA C kernel would be needed for their 2x math rate.)

Checked on CPU with ``TRITON_INTERPRET=1`` against torch, and compiled to cubin for sm_80
and sm_90 without a GPU (``compile_cubin``), in tests/sparse/test_triton_sparse24.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = {"none": 0, "relu": 1, "gelu_tanh": 2}


@triton.jit
def sparse24_gemm_kernel(x_ptr, v_ptr, p_ptr, b_ptr, y_ptr, M, N, K,
                         stride_xm, stride_vn, stride_ym,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # dense column k of the tile reads compressed slots 2*(k//4) and 2*(k//4)+1
    slot = (rk // 4) * 2
    pos = (rk % 4).to(tl.int8)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        wmask = (rn[:, None] < N) & (kk[None, :] < K)
        off = rn[:, None] * stride_vn + (k0 // 2 + slot)[None, :]
        v0 = tl.load(v_ptr + off, mask=wmask, other=0.0)
        v1 = tl.load(v_ptr + off + 1, mask=wmask, other=0.0)
        p0 = tl.load(p_ptr + off, mask=wmask, other=-1)
        p1 = tl.load(p_ptr + off + 1, mask=wmask, other=-1)
        w = tl.where(p0 == pos[None, :], v0, tl.where(p1 == pos[None, :], v1, tl.zeros_like(v0)))
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def sparse24_linear(x, values, positions, bias=None, activation: str = "none",
                    block_m: int = 32, block_n: int = 32, block_k: int = 32):
    """Launch the kernel (on a GPU, or on CPU under TRITON_INTERPRET=1)."""
    import torch

    m, k = x.shape
    n = values.shape[0]
    if k % 4 or values.shape != (n, k // 2) or positions.shape != (n, k // 2) or positions.dtype != torch.int8:
        raise ValueError("2:4 weight: values and int8 positions must be [N, K/2] with K % 4 == 0")
    if block_k % 4:
        raise ValueError("block_k must be a multiple of 4 (whole groups per step)")
    x, values, positions = x.contiguous(), values.contiguous(), positions.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    sparse24_gemm_kernel[grid](x, values, positions, bias if bias is not None else values, y, m, n, k,
                               x.stride(0), values.stride(0), y.stride(0),
                               HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation],
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def compile_cubin(sm: int, dtype: str = "fp16", block_m: int = 64, block_n: int = 64, block_k: int = 64,
                  has_bias: bool = True, activation: str = "relu") -> bytes:
    """Compile the kernel for ``cuda`` sm_``sm`` without a GPU; returns the cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "p_ptr": "*i8", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_vn": "i32", "stride_ym": "i32",
           "HAS_BIAS": "constexpr", "ACT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr"}
    consts = {"HAS_BIAS": has_bias, "ACT": ACTIVATIONS[activation], "BLOCK_M": block_m, "BLOCK_N": block_n,
              "BLOCK_K": block_k}
    src = ASTSource(fn=sparse24_gemm_kernel, signature=sig, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32))
    return compiled.asm["cubin"]

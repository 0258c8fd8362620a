"""fp32 GEMM through MKL's packed sgemm, weights packed once at plan build, for any row count.

On BERT-base's GEMM shapes (128 rows, one thread) MKL's packed kernel measured 5-12%
faster than oneDNN's prepacked inner product (``kiln bench kernels --op linear --shapes
128x768x768,128x768x2304,128x768x3072,128x3072x768 --threads 1``), so it is a candidate
beside ``cpu.onednn_linear`` and the reference; ``kernels.choice`` keeps whichever is fastest
per node. The epilogue (residual add, activation) runs after the GEMM, as torch ops: MKL has
no post-ops, and where a fused oneDNN epilogue is worth more, the oneDNN candidate wins the
measurement.

A node of symbolic rows (a dynamic plan) calls MKL directly (``cblas_sgemm_pack`` /
``cblas_sgemm_compute``, the functions torch's ``mkl::_mkl_linear`` calls, from the MKL inside
torch's own library) rather than through that op, because the op uses the packed weight only
when the row count equals the one it was packed for and otherwise runs an unpacked GEMM:
MKL's packed B serves any number of rows, so one packed weight serves every batch size and
sequence length. A node of static rows always has the packed row count, and goes through
the op (``_static_rows``): the same GEMM without ctypes' per-call cost.
"""
from __future__ import annotations

import ctypes
import math
import os

import torch

from kiln.ir import Node, OpKind

from kiln.ir.reference import epilogue
from .registry import register_kernel

# CBLAS enumerations (mkl_cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS, _B_MATRIX, _PACKED = 101, 111, 112, 162, 151


def _load_mkl():
    """MKL's packed-GEMM entry points from torch's CPU library (None where torch has no MKL)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get_size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
    except (OSError, AttributeError):
        return None
    get_size.restype = ctypes.c_size_t
    get_size.argtypes = [ctypes.c_int] * 4
    pack.restype = None
    pack.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    compute.restype = None
    compute.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    return get_size, pack, compute


_FNS = _load_mkl()
_INT_MAX = 2**31 - 1  # MKL_INT is 32-bit (LP64 interface)


def available() -> bool:
    """Whether torch's MKL (and its packed-GEMM functions) is there to call."""
    return _FNS is not None


def _accepts(node: Node) -> bool:
    x, w = node.inputs[0].type, node.inputs[1].type
    # leading dims may be symbolic (a plan serving many sizes): rows are read per call
    return (_FNS is not None and x.rank >= 2 and isinstance(x.shape[-1], int) and x.dtype.value == "float32" and
            w.dtype.value == "float32" and w.rank == 2 and w.shape[1] == x.shape[-1] and
            all(isinstance(d, int) and 0 < d <= _INT_MAX for d in w.shape))


def pack_weight(w: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """``w`` ([N, K] fp32) as MKL's packed B of ``x @ w.T``, in a byte tensor Kiln owns."""
    get_size, pack, _ = _FNS
    n, k = w.shape
    w = w.contiguous()
    m = max(1, min(rows_hint, _INT_MAX))
    buf = torch.empty(get_size(_B_MATRIX, m, n, k) + 64, dtype=torch.uint8)
    off = (-buf.data_ptr()) % 64  # MKL asks for 64-byte alignment
    packed = buf[off:]
    pack(_ROW_MAJOR, _B_MATRIX, _TRANS, m, n, k, 1.0, w.data_ptr(), k, packed.data_ptr())
    return packed


def packed_linear(x2: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """[M, N] = x2 [M, K] (unit stride along K) times the packed weight, plus ``bias``."""
    _, _, compute = _FNS
    m, k = x2.shape
    if m > _INT_MAX or (m > 1 and not k <= x2.stride(0) <= _INT_MAX):
        x2 = x2.contiguous()
    out = torch.empty((m, n), dtype=torch.float32)
    if bias is not None:  # beta = 1 over rows of the bias, as torch's packed path does (a
        out.copy_(bias)   # copy: one row of an expanded bias would be the bias itself)
    if m:
        lda = x2.stride(0) if m > 1 else k
        compute(_ROW_MAJOR, _NO_TRANS, _PACKED, m, n, k, x2.data_ptr(), max(lda, 1), packed.data_ptr(), k,
                1.0 if bias is not None else 0.0, out.data_ptr(), n)
    return out


def _prepare(node: Node, consts: list):
    w = consts[1]
    if w is None:
        return None
    x = node.inputs[0].type
    n, k = w.shape
    static_rows = math.prod(x.shape[:-1]) if all(isinstance(d, int) for d in x.shape) else None
    bias_c = consts[2] if len(consts) > 2 else None
    bias_c = None if bias_c is None else bias_c.float().contiguous()
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    has_res = len(node.inputs) > 3 and node.inputs[3] is not None
    if static_rows and _TORCH_OP is not None:
        return _static_rows(w, static_rows, bias_c, has_bias, has_res)
    packed = pack_weight(w, static_rows or 128)

    def run(ins, a):
        xt = ins[0]
        if xt.stride(-1) != 1:
            xt = xt.contiguous()
        lead = xt.shape[:-1]
        x2 = xt.reshape(-1, k) if xt.numel() else xt.new_empty((math.prod(lead), k))
        bias = (bias_c if bias_c is not None else ins[2].float().contiguous()) if has_bias else None
        y = packed_linear(x2, packed, n, bias).view(*lead, n)
        return epilogue(y, ins[3] if has_res else None, a.activation)
    return run


def _static_rows(w: torch.Tensor, rows: int, bias_c, has_bias: bool, has_res: bool):
    """A node of one row count: torch's own ``mkl::_mkl_linear`` on the weight packed by its
    ``_mkl_reorder_linear_weight`` -- the same MKL packed GEMM (bit for bit) reached from
    C++ rather than through ctypes, whose argument conversion is a fixed cost the size of a
    small GEMM (a time-series mixer's linears of 8-126 channels). The op takes the packed
    path only at the row count it was packed for, which a static node always has."""
    w = w.float().contiguous()
    packed = _TORCH_OP[0](w, rows)

    def run(ins, a):
        bias = (bias_c if bias_c is not None else ins[2].float().contiguous()) if has_bias else None
        y = _TORCH_OP[1](ins[0], packed, w, bias, rows)
        return epilogue(y, ins[3] if has_res else None, a.activation)
    return run


def _torch_op():
    """torch's ``(mkl::_mkl_reorder_linear_weight, mkl::_mkl_linear)`` (None without them)."""
    try:
        return torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_linear
    except (AttributeError, RuntimeError):
        return None


_TORCH_OP = _torch_op() if _FNS is not None else None


def _unusable(ins, a):
    raise RuntimeError("cpu.mkl_linear needs a constant weight")


def _prepare_or_unusable(node, consts):
    fn = _prepare(node, consts)
    return fn if fn is not None else _unusable


register_kernel(OpKind.LINEAR, "cpu", name="cpu.mkl_linear", accepts=_accepts, prepare=_prepare_or_unusable,
                dynamic=True)(_unusable)

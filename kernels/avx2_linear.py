"""fp32 LINEAR in Kiln's own AVX2 + FMA GEMM (``kiln._C.f32_linear``, ``csrc/f32_gemm.cpp``):
the weight packed once into 16-channel panels, any row count, the bias added in the GEMM's
first block, a ReLU or GELU applied as the last block stores; a residual (and the activation
after it) follow as torch ops, as ``cpu.mkl_linear``'s do.

A candidate beside MKL's packed sgemm, oneDNN and the reference; ``kernels.choice`` keeps
whichever measures fastest per node. It exists for CPUs without AVX-512, where MKL's and
oneDNN's GEMMs run a text model's short row counts well below the FMA units' peak and
oneDNN's pads every new row count up to a bucket (`kiln bench kernels --op linear` times
them side by side); one packed weight serves every sequence length of a dynamic plan. Where
the CPU has AVX-512 it is no candidate (see ``_accepts``).
"""
from __future__ import annotations

import math

import torch

from kiln.ir import Node, OpKind
from kiln.ir.reference import epilogue

from .amx_linear import bits
from .onednn import with_fallback
from .registry import register_kernel


def supported() -> bool:
    from kiln import _C

    return _C.f32_gemm_supported()


def _host_has_avx512() -> bool:
    from kiln.target import host_cpu  # (cached: read once per process)

    return "avx512f" in host_cpu().features


def _accepts(node: Node) -> bool:
    x, w = node.inputs[0].type, node.inputs[1].type
    # leading dims may be symbolic (a plan serving many sizes): rows are read per call. Not
    # offered where the CPU has AVX-512: MKL's and oneDNN's GEMMs run twice this kernel's
    # lanes there, so it could not win a measurement, only lengthen every fp32 linear's.
    return (x.rank >= 2 and isinstance(x.shape[-1], int) and x.dtype.value == "float32" and
            w.dtype.value == "float32" and w.rank == 2 and w.is_static and w.shape[1] == x.shape[-1] and
            0 not in w.shape and supported() and not _host_has_avx512())


def _prepare(node: Node, consts: list):
    from kiln import _C

    w = consts[1]
    if w is None:
        return None
    n = w.shape[0]
    packed = _C.f32_prepack(w.float().contiguous().numpy())
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    bias_c = consts[2] if has_bias and len(consts) > 2 else None
    bias_c = None if bias_c is None else bias_c.float().contiguous().numpy()
    has_res = len(node.inputs) > 3 and node.inputs[3] is not None
    # ReLU and GELU without a residual are applied as the tile stores (no second pass over the
    # output); the rest (residual first, then the activation) as torch ops after it
    fused = not has_res and node.attrs.activation.value in _FUSED
    in_gemm = node.attrs.activation.value if fused else "none"

    def run(ins, a):
        x = ins[0]
        lead = x.shape[:-1]
        out = torch.empty((*lead, n), dtype=torch.float32)
        if math.prod(lead):  # (no rows: nothing to compute)
            bias = bias_c if bias_c is not None or not has_bias else ins[2].float().contiguous().numpy()
            _C.f32_linear(bits(x), packed, bias, out.view(-1, n).numpy(), torch.get_num_threads(), in_gemm)
        return out if fused else epilogue(out, ins[3] if has_res else None, a.activation)
    return run


_FUSED = ("none", "relu", "gelu")  # the activations kiln._C.f32_linear applies itself


def _unusable(ins, a):
    raise RuntimeError("cpu.avx2_linear needs a constant weight")


register_kernel(OpKind.LINEAR, "cpu", name="cpu.avx2_linear", accepts=_accepts, prepare=with_fallback(_prepare, _unusable),
                requires=frozenset({"avx2", "fma"}), dynamic=True)(_unusable)

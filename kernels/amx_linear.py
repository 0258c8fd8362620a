"""bf16 LINEAR in C++ on Kiln's packed weight (``csrc/bf16_gemm.cpp``): the weight prepacked
once into 16-channel panels of k pairs, fp32 sums, bias + residual + activation fused into
the store, one bf16 rounding at the end. Two kernels share the packing:

* ``cpu.amx_linear`` (``kiln._C.bf16_linear``) on AMX tiles. At BERT-base's shapes it and
  oneDNN's prepacked bf16 linear are about as fast (`python -m kiln.bench.bf16_gemm`:
  0.95-1.17x oneDNN per shape in one run).
* ``cpu.bf16_dot_linear`` (``kiln._C.bf16_dot_linear``) on AVX512-BF16 dot products, for
  CPUs without AMX. Its use is small layers (PatchTSMixer's, a decoder's picked last token),
  where oneDNN's per-call cost is most of the time; at large shapes oneDNN's is faster.

Both are candidates beside oneDNN's and the reference; ``kernels.choice`` keeps whichever
measures faster on the node's shapes.
"""
from __future__ import annotations

import math

import torch

from kiln.ir import Node, OpKind
from kiln.ir import attrs as A

from .nhwc import native_array
from .onednn import with_fallback
from .registry import AMX_BF16, AVX512_BF16, register_kernel

_ACTIVATIONS = {A.Activation.NONE: "none", A.Activation.RELU: "relu", A.Activation.TANH: "tanh",
                A.Activation.SIGMOID: "sigmoid", A.Activation.SILU: "silu", A.Activation.GELU: "gelu",
                A.Activation.GELU_TANH: "gelu_tanh"}


def supported() -> bool:
    from kiln import _C

    return _C.bf16_gemm_supported()


def dot_supported() -> bool:
    from kiln import _C

    return _C.bf16_dot_gemm_supported()


def _accepts(node: Node) -> bool:
    return _shapes_ok(node) and supported()


def _dot_accepts(node: Node) -> bool:
    return _shapes_ok(node) and dot_supported()


def _shapes_ok(node: Node) -> bool:
    x, w = node.inputs[0].type, node.inputs[1].type
    # leading dims may be symbolic (a plan serving many sizes): rows are read per call
    if not (x.rank >= 2 and isinstance(x.shape[-1], int) and x.dtype.value == "bfloat16" and w.dtype == x.dtype
            and w.rank == 2 and w.is_static):
        return False
    if x.shape[-1] != w.shape[1] or 0 in w.shape or node.attrs.activation not in _ACTIVATIONS:
        return False
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        r = node.inputs[3].type
        if r.dtype.value not in ("bfloat16", "float32") or tuple(r.shape) != tuple(node.outputs[0].type.shape):
            return False
    return True


def bits(t: torch.Tensor):
    """The numpy view of a bf16 tensor (its int16 bits) or an fp32 one, as a 2-D [rows, cols]
    array with a contiguous last dimension (rows may keep a stride)."""
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        t = t.contiguous()  # overlapping (broadcast) rows
    return native_array(t)


def _prepare(node: Node, consts: list, dot: bool = False):
    from kiln import _C

    w = consts[1]
    if w is None:
        return None
    packed = _C.bf16_prepack(bits(w.contiguous()))
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    bias_c = consts[2] if has_bias else None
    bias_c = None if bias_c is None else bias_c.float().contiguous().numpy()
    has_res = len(node.inputs) > 3 and node.inputs[3] is not None
    act = _ACTIVATIONS[node.attrs.activation]
    n = w.shape[0]
    gemm = _C.bf16_dot_linear if dot else _C.bf16_linear

    def run(ins, attrs):
        x = ins[0]
        lead = x.shape[:-1]
        rows = math.prod(lead)
        out = torch.empty((*lead, n), dtype=torch.bfloat16)
        if rows == 0:
            return out
        if x.dim() != 2:  # a view when the leading dims merge, else a copy
            x = x.reshape(rows, x.shape[-1])
        bias = bias_c if bias_c is not None or not has_bias else ins[2].float().contiguous().numpy()
        gemm(bits(x), packed, bias, bits(ins[3]) if has_res else None, act,
             out.view(rows, n).view(torch.int16).numpy(), torch.get_num_threads())
        return out
    return run


def _prepare_dot(node: Node, consts: list):
    return _prepare(node, consts, dot=True)


def _unusable(ins, a):
    raise RuntimeError("a packed bf16 linear needs a constant weight")


register_kernel(OpKind.LINEAR, "cpu", name="cpu.amx_linear", accepts=_accepts,
                prepare=with_fallback(_prepare, _unusable), requires=AMX_BF16, dynamic=True)(_unusable)
register_kernel(OpKind.LINEAR, "cpu", name="cpu.bf16_dot_linear", accepts=_dot_accepts,
                prepare=with_fallback(_prepare_dot, _unusable), requires=AVX512_BF16, dynamic=True)(_unusable)

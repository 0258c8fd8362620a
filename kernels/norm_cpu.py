"""Group norms over channels-last images in C++ (``kiln._C.group_norm_nhwc``).

A candidate beside the reference for 4-D channels-last fp32 or bf16 GROUP_NORM (BiT's norms
between its convolutions; in bf16 they read the convolutions' bf16 outputs and write the next
ones' bf16 inputs, fp32 math inside), a fused ReLU included; ``kernels.choice`` keeps
whichever measures faster on the node's shapes.
Each pass runs over the pixels with the channels innermost, the way the image lies, where a
layer norm over each group's NCHW-ordered elements reads it across the grain; the variance
is a second pass over the deviations (see csrc/group_norm.cpp). The affine, when constant,
is bound once.
"""
from __future__ import annotations

import torch

from kiln.ir import LayoutKind, Node, OpKind
from kiln.ir import attrs as A

from .nhwc import as_channels_last, nhwc_array
from .registry import register_kernel


def _accepts(node: Node) -> bool:
    x = node.inputs[0].type
    return (x.rank == 4 and x.layout.kind is LayoutKind.CHANNELS_LAST and x.dtype.value in ("float32", "bfloat16")
            and isinstance(x.shape[1], int) and node.attrs.activation in (A.Activation.NONE, A.Activation.RELU)
            and all(v is None or v.type.dtype.value in ("float32", "bfloat16") for v in node.inputs[1:]))


def _param(t):
    return None if t is None else t.detach().float().contiguous().numpy()


def _prepare(node: Node, consts: list):
    from kiln import _C

    groups, eps = node.attrs.groups, float(node.attrs.eps)
    relu = node.attrs.activation is A.Activation.RELU
    present = [i < len(node.inputs) and node.inputs[i] is not None for i in (1, 2)]
    bound = [_param(consts[i]) if present[i - 1] and i < len(consts) and consts[i] is not None else None
             for i in (1, 2)]

    def run(ins, attrs):
        x = as_channels_last(ins[0])
        y = torch.empty_like(x, memory_format=torch.channels_last)
        w, b = (bound[j] if bound[j] is not None else (_param(ins[j + 1]) if present[j] else None) for j in (0, 1))
        n, c, h, wd = x.shape
        _C.group_norm_nhwc(nhwc_array(x).reshape(n, h * wd, c), nhwc_array(y).reshape(n, h * wd, c), w, b, groups,
                           eps, relu=relu, threads=torch.get_num_threads())
        return y
    return run


@register_kernel(OpKind.GROUP_NORM, "cpu", name="cpu.group_norm_nhwc", accepts=_accepts, prepare=_prepare,
                 dynamic=True)
def group_norm_nhwc(ins, attrs):
    raise RuntimeError("cpu.group_norm_nhwc runs through its prepared function")

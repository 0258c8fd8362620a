"""CPU kernels for sparse weights (kiln._C.sparse_linear / sparse_gemm_t), and the timing
the sparsity pass uses to choose a weight's storage format.

SPARSE_LINEAR runs x [M, K] @ W^T with W in CSR or BSR; SPARSE_CONV2D runs 1x1 stride-1
convolutions as that same linear over the pixels of a channels-last input, and every
other convolution as im2col ([C*kh*kw, H*W] per image) x sparse weight, which yields the
NCHW output directly. Bias, residual and activation are fused in the kernel's epilogue.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.ir import LayoutKind, Node, OpKind
from kiln.ir import attrs as A
from kiln.ir.sparse import CSR, block_of, densify, encode

from .registry import candidates, register_kernel

_ACT_CODES = {act: i for i, act in enumerate(A.Activation)}  # the order csrc/kiln.h's SparseAct follows


def _native():
    from kiln import _C

    return _C


def supported() -> bool:
    return _native().sparse_gemm_supported()


def _accepts(node: Node) -> bool:
    a = node.attrs
    x = node.inputs[0].type
    bh, _ = block_of(a.layout)
    return (supported() and x.dtype.value == "float32" and node.inputs[1].type.dtype.value == "float32"
            and a.layout.kind in (LayoutKind.SPARSE_CSR, LayoutKind.SPARSE_BSR, LayoutKind.SPARSE_24)
            and bh in (1, 2, 4, 8, 16))


def _opt(ins, i):
    return ins[i] if len(ins) > i else None


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().contiguous().numpy()


def _weight(node: Node, consts: list):
    """The weight arrays as numpy, converted once at plan build (or per call if not constant).

    A 2:4 weight (the ``cuda`` target's format) runs here as CSR: the same nonzeros."""
    a = node.attrs
    if a.layout.kind is LayoutKind.SPARSE_24:
        shape = (a.shape[0], math.prod(a.shape[1:]))

        def as_csr(parts):
            e = encode(densify(a.layout, shape, parts[0], parts[1], None), CSR)
            return [_np(e.values), _np(e.indices), _np(e.indptr)]
        if consts[1] is not None and consts[2] is not None:
            fixed = as_csr(consts[1:3])
            return lambda ins: fixed
        return lambda ins: as_csr(ins[1:3])
    fixed = [None if c is None else _np(c) for c in consts[1:4]]
    return lambda ins: [f if f is not None else _np(ins[i + 1]) for i, f in enumerate(fixed)]


def _threads() -> int:
    return torch.get_num_threads()  # plans are specialized to the thread count they were built for


def _prepare_linear(node: Node, consts: list):
    a: A.SparseLinearAttrs = node.attrs
    n, k = a.shape
    bh, bw = block_of(a.layout)
    weight = _weight(node, consts)
    act = _ACT_CODES[a.activation]
    threads = _threads()

    def run(ins, attrs):
        values, col, row_ptr = weight(ins)
        x = ins[0]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).contiguous()
        y = torch.empty(x2.shape[0], n)
        res = _opt(ins, 5)
        _native().sparse_linear(x2.numpy(), values, col, row_ptr, n, bh, bw, _np(_opt(ins, 4)),
                                None if res is None else _np(res.reshape(-1, n)), act, y.numpy(), threads)
        return y.reshape(*lead, n)
    return run


def _prepare_conv(node: Node, consts: list):
    a: A.SparseConv2dAttrs = node.attrs
    co, ci, kh, kw = a.shape
    bh, bw = block_of(a.layout)
    weight = _weight(node, consts)
    act = _ACT_CODES[a.activation]
    threads = _threads()
    pointwise = (kh, kw) == (1, 1) and a.stride == (1, 1) and a.padding == (0, 0)
    out_cl = node.outputs[0].type.layout.kind is LayoutKind.CHANNELS_LAST

    def run(ins, attrs):
        values, col, row_ptr = weight(ins)
        x, bias, res = ins[0], _np(_opt(ins, 4)), _opt(ins, 5)
        b, _, h, w = x.shape
        if pointwise and x.is_contiguous(memory_format=torch.channels_last):
            # a channels-last 1x1 convolution is a linear layer over its pixels (no copies)
            rows = x.permute(0, 2, 3, 1).reshape(-1, ci)
            y = torch.empty(rows.shape[0], co)
            r = None if res is None else _np(res.permute(0, 2, 3, 1).reshape(-1, co))
            _native().sparse_linear(rows.numpy(), values, col, row_ptr, co, bh, bw, bias, r, act, y.numpy(), threads)
            return y.view(b, h, w, co).permute(0, 3, 1, 2)
        if pointwise:
            cols = x.contiguous().reshape(b, ci, h * w)
        else:
            cols = F.unfold(x, (kh, kw), a.dilation, a.padding, a.stride).contiguous()
        oh, ow = node.outputs[0].type.shape[2:]
        yt = torch.empty(b, co, cols.shape[2])
        r = None if res is None else _np(res.reshape(b, co, -1))
        _native().sparse_gemm_t(cols.numpy(), values, col, row_ptr, co, bh, bw, bias, r, act, yt.numpy(), threads)
        y = yt.view(b, co, oh, ow)
        # deliver the layout the graph planned (channels-last consumers would convert it anyway)
        return y.contiguous(memory_format=torch.channels_last) if out_cl else y
    return run


def _needs_constants(ins, a):
    raise RuntimeError("the sparse kernel is bound at plan build (prepare)")


register_kernel(OpKind.SPARSE_LINEAR, "cpu", name="cpu.sparse_linear", accepts=_accepts,
                prepare=_prepare_linear)(_needs_constants)
register_kernel(OpKind.SPARSE_CONV2D, "cpu", name="cpu.sparse_conv2d", accepts=_accepts,
                prepare=_prepare_conv)(_needs_constants)


# ----------------------------------------------------------------------------- measurement
def measure(options: list[tuple[Node, list]], target: str = "cpu", rounds: int = 5) -> list[tuple[float, str, float]]:
    """Time the nodes in ``options`` (each with its operands' constants) on their real shapes.

    Each option runs the kernels the runtime could pick for it; the rounds interleave all
    options' kernels so a burst of load elsewhere on the machine hits them alike. Returns
    (best seconds, kernel name, max abs difference from the first option's output) per
    option; a kernel that disagrees with the first option (the dense original) beyond
    float32 rounding scores infinity.
    """
    from .choice import agrees, random_like
    from .timing import best_seconds

    bound = []  # (option index, kernel name, fn, inputs)
    x = None
    for i, (node, consts) in enumerate(options):
        if x is None:  # in the layout the plan will pass (a channels-last conv input costs differently)
            x = random_like(node.inputs[0])
            if node.inputs[0].type.layout.kind is LayoutKind.CHANNELS_LAST and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        ins = [x] + [None if v is None else (c if c is not None else random_like(v))
                     for v, c in zip(node.inputs[1:], consts[1:])]
        for k in candidates(node, target):
            if i > 0 and k.target == "reference":
                continue  # a sparse option runs a sparse kernel (the reference densifies)
            try:
                bound.append((i, k.name, k.bind(node, consts), ins, node.attrs))
            except Exception:
                continue
    err = [math.inf] * len(options)
    ref = None
    live = []
    with torch.no_grad():
        for i, name, fn, ins, attrs in bound:
            try:
                out = fn(ins, attrs)
            except Exception:  # noqa: BLE001  (a kernel that fails is not a candidate)
                continue
            if ref is None:
                ref = out
            if agrees(out, ref):
                err[i] = min(err[i], float((out - ref).abs().max()) if out.numel() else 0.0)
                live.append((i, name, fn, ins, attrs))
    seconds = best_seconds([lambda fn=fn, ins=ins, attrs=attrs: fn(ins, attrs) for _, _, fn, ins, attrs in live], rounds)
    best = [(math.inf, "")] * len(options)
    for (i, name, *_), t in zip(live, seconds):
        if t < best[i][0]:
            best[i] = (t, name)
    return [(t, name, e) for (t, name), e in zip(best, err)]

"""Winograd convolution for 3x3 stride-1 fp32 convolutions over channels-last activations.

F(m x m, 3 x 3) computes each m x m output tile from a (m+2) x (m+2) input tile with
(m+2)^2 multiplies per channel pair instead of 9 m^2: 4x fewer for F(4x4), 2.25x for
F(2x2). The work becomes (m+2)^2 independent GEMMs ``V[p] @ U[p]`` between an input and an
output transform: the transforms are C++ (``csrc/winograd.cpp``, vectorized over channels,
the epilogue — bias, residual add, ReLU — fused into the output transform), the GEMMs are
``torch.bmm`` (MKL), the weights are transformed once at plan build.

The arithmetic differs from a direct convolution's, so the result does too: with
unit-variance inputs and He-initialised weights ``tests/kernels/test_winograd.py`` holds
F(4x4) to 2e-5 and F(2x2) to 2e-6 of the largest output against a float64 convolution,
both inside the fp32 agreement that ``kernels.choice`` demands of every candidate (1e-4 of
the largest output) before it may be timed. The transforms
subtract, so an input holding +-inf gives NaN where a direct convolution may give +-inf.
Both tile sizes are candidates: F(4x4) wins where the GEMMs are compute bound (large
images, few channels), F(2x2) where the transformed weights (16/9 of the weights against
F(4x4)'s 4x) must stream from memory (7x7 images, 512 channels), and oneDNN's direct conv
where neither pays (``kiln bench kernels --op conv2d``).

bf16 convolutions (``precision="bf16"``) have ``cpu.winograd2_conv_bf16`` on CPUs with
AVX512-BF16: F(2x2) only, the transforms reading and writing bf16 (fp32 arithmetic, each
result rounded once) and the GEMMs ``torch.bmm`` in bf16. Its rounding of the transformed
input and of the GEMM's result puts it about twice as far from the exact convolution as a
direct bf16 convolution (``tests/kernels/test_winograd.py`` bounds it); F(4x4)'s transforms
would multiply bf16's rounding by about forty, so there is no bf16 F(4x4).
"""
from __future__ import annotations

import torch

from kiln.ir import LayoutKind, Node, OpKind
from kiln.ir import attrs as A

from .derived import derive
from .nhwc import as_channels_last, native_array, nhwc_array
from .registry import AVX512_BF16, register_kernel

# Winograd's G matrices (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks"):
# U = G g G^T transforms a 3x3 filter g. The kernels (csrc/winograd.cpp) hold their own copy
# with B^T and A^T; this one is the definition the tests check them against.
_G = {2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
      4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
          (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))}


def transform_weight(w: torch.Tensor, m: int) -> torch.Tensor:
    """U [(m+2)^2, C, K] of a [K, C, 3, 3] weight: U[(i, j), c, k] = (G g G^T)[i, j] for
    g = w[k, c], computed in float64 and rounded once to float32.

    At load this runs for every 3x3 layer that chose Winograd, so it must cost about one
    pass over U: ``kiln._C.winograd_weight`` reads each filter once and writes U in the
    layout the kernel reads (a float64 GEMM over converted copies of the weight wrote and
    read the weight three times over)."""
    from kiln import _C

    k, c = w.shape[0], w.shape[1]
    u = torch.empty((m + 2) ** 2, c, k, dtype=torch.float32)
    _C.winograd_weight(w.detach().float().contiguous().numpy(), u.numpy(), m, torch.get_num_threads())
    return u


# The transformed weights' arithmetic and layout (``kernels.derived``): bumped when either
# changes, so transformed weights stored by another version are made again, not used.
TRANSFORM_VERSION = 1

# The transformed input and the GEMM result are (m+2)^2 / m^2 times the size of the input
# and output (2.25x for F(4x4), 4x for F(2x2)). A call runs its batch in chunks of whole
# images whose transformed buffers stay under CHUNK_BYTES each, so what a call holds beyond
# its input and output does not grow with the batch (a dynamic plan's largest batch would
# otherwise hold several times its activations at once) and the buffers stay in the cache
# between the transforms and the GEMMs; an image whose buffers alone pass MAX_BUFFER_BYTES
# (very large images) leaves the direct convolution alone.
CHUNK_BYTES = 8 << 20
MAX_BUFFER_BYTES = 256 << 20


def _buffer_bytes(node: Node, m: int, batch: int | None = None, elem_bytes: int = 4) -> int:
    """The larger transformed buffer's bytes (input or GEMM result) at ``batch`` images."""
    n, c, _, _ = node.inputs[0].type.shape
    _, k, oh, ow = node.outputs[0].type.shape
    n = batch if batch is not None else n
    return (m + 2) ** 2 * n * -(-oh // m) * -(-ow // m) * max(c, k) * elem_bytes


def _accepts(node: Node, dtype: str = "float32") -> bool:
    if len(node.inputs) < 2:
        return False
    x, w = node.inputs[0].type, node.inputs[1].type
    a: A.Conv2dAttrs = node.attrs
    # the batch may vary per call (a dynamic plan); channels and image size may not
    if not (x.rank == 4 and all(isinstance(d, int) for d in x.shape[1:]) and
            x.layout.kind is LayoutKind.CHANNELS_LAST):
        return False
    if x.dtype.value != dtype or w.dtype.value != dtype or tuple(w.shape[2:]) != (3, 3):
        return False
    if any(v is not None and v.type.dtype.value != dtype for v in node.inputs[3:]):  # the residual
        return False
    if a.stride != (1, 1) or a.dilation != (1, 1) or a.groups != 1:
        return False
    if a.activation not in (A.Activation.NONE, A.Activation.RELU) or min(a.padding) < 0:
        return False
    if _buffer_bytes(node, 2, 1) > MAX_BUFFER_BYTES:
        return False
    from kiln import _C

    return _C.winograd_bf16_supported() if dtype == "bfloat16" else _C.winograd_supported()


def _accepts_bf16(node: Node) -> bool:
    return _accepts(node, "bfloat16")


def _prepare(m: int, bf16: bool = False):
    def prepare(node: Node, consts: list):
        from kiln import _C

        w = consts[1]
        if w is None or _buffer_bytes(node, m, 1) > MAX_BUFFER_BYTES:
            return _unusable
        a: A.Conv2dAttrs = node.attrs
        ph, pw = a.padding
        _, c, h, wd = node.inputs[0].type.shape
        _, k, oh, ow = node.outputs[0].type.shape
        # portable (Kiln's own float64 arithmetic, rounded once): an artifact ships it
        # bf16: U of the bf16 weight, as fp32's (float64, rounded to fp32), then rounded to bf16
        dt = torch.bfloat16 if bf16 else torch.float32
        u = derive(f"cpu.winograd{m}_conv" + ("_bf16" if bf16 else ""), TRANSFORM_VERSION, w,
                   lambda: transform_weight(w, m).to(dt),
                   lambda t: t.dtype == dt and tuple(t.shape) == ((m + 2) ** 2, c, k) and t.is_contiguous())
        tiles_per_image = -(-oh // m) * -(-ow // m)
        # images per chunk: their transformed input and GEMM result each under CHUNK_BYTES
        chunk = max(1, CHUNK_BYTES // _buffer_bytes(node, m, 1, dt.itemsize))
        bias_c = consts[2] if len(consts) > 2 and consts[2] is not None else None
        if bias_c is not None:
            bias_c = bias_c.float().contiguous()
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        has_res = len(node.inputs) > 3 and node.inputs[3] is not None
        relu = a.activation is A.Activation.RELU

        transform_in, transform_out = ((_C.winograd_input_bf16, _C.winograd_output_bf16) if bf16 else
                                       (_C.winograd_input, _C.winograd_output))

        def run(ins, attrs):
            n = ins[0].shape[0]  # per call: a dynamic plan's batch varies
            bias = (bias_c if bias_c is not None else ins[2].float().contiguous()) if has_bias else None
            bias = None if bias is None else bias.numpy()
            threads = torch.get_num_threads()
            x = as_channels_last(ins[0])
            res = as_channels_last(ins[3]) if has_res else None
            y = torch.empty((n, k, oh, ow), dtype=dt, memory_format=torch.channels_last)
            rows = min(n, chunk) * tiles_per_image
            # one pair of buffers for every chunk; the last, shorter chunk uses their fronts
            # (a prefix of a contiguous buffer is itself contiguous)
            vbuf = torch.empty(u.shape[0] * rows * c, dtype=dt)
            mbuf = torch.empty(u.shape[0] * rows * k, dtype=dt)
            for i in range(0, n, chunk):
                j = min(n, i + chunk)
                t = (j - i) * tiles_per_image
                v = vbuf[:u.shape[0] * t * c].view(u.shape[0], t, c)
                mt = mbuf[:u.shape[0] * t * k].view(u.shape[0], t, k)
                transform_in(nhwc_array(x[i:j]), native_array(v), oh, ow, k, ph, pw, m, threads)
                torch.bmm(v, u, out=mt)
                transform_out(native_array(mt), nhwc_array(y[i:j]), bias,
                              None if res is None else nhwc_array(res[i:j]), relu, h, wd, c, ph, pw, m, threads)
            return y
        return run
    return prepare


def _unusable(ins, a):
    raise RuntimeError(f"Winograd convolution needs a constant weight and an image's transformed buffers "
                       f"under {MAX_BUFFER_BYTES >> 20} MB")


for _m in (4, 2):
    register_kernel(OpKind.CONV2D, "cpu", name=f"cpu.winograd{_m}_conv", accepts=_accepts, dynamic=True,
                    prepare=_prepare(_m), approximate=True)(_unusable)
register_kernel(OpKind.CONV2D, "cpu", name="cpu.winograd2_conv_bf16", accepts=_accepts_bf16, dynamic=True,
                prepare=_prepare(2, bf16=True), approximate=True, requires=AVX512_BF16)(_unusable)

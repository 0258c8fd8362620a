"""Kiln's quantized CPU GEMMs (C++, ``kiln._C``) for torch tensors, with a pure-torch
reference for each (the test oracle).

Operands are in Kiln's quantized formats (``kiln.ir.qformat``): int8 weights per output
channel, int4 weights packed two per byte with group scales (group size in
``qformat.INT4_GROUP_SIZES``), uint8 activations with a zero point, per row (dynamic) or per
tensor (static, from calibration).

The int8 core computes ``acc = x_q @ w_q^T`` exactly in int32 with AVX512-VNNI (vpdpbusd) or
AMX-INT8 (tdpbusd; chosen automatically when present and M >= 16), then a fused epilogue
``y = act(x_scale[m] * w_scale[n] * (acc[m, n] - x_zp[m] * w_q[n].sum()) + bias[n])``.
Activations: ``none``, ``relu``, ``gelu`` (erf), ``gelu_tanh``, ``silu``.
Weights are prepacked once (``prepack_int8`` / ``prepack_int4`` / ``prepack_conv_int8``) into
the kernels' own blocked layout (``csrc/quant_gemm.h``), at plan-build time. ``threads``
defaults to ``torch.get_num_threads()``; results can go to a preallocated ``out``.

Entry points: ``qlinear_dynamic`` (fp32 in, per-row dynamic quantization, fp32 out),
``qlinear_static`` (uint8 in, fp32 or requantized uint8 out), ``int8_gemm_s32`` (the exact
int32 core), ``qconv2d_nhwc`` (int8 conv via im2col + the GEMM), ``linear_int4`` (int4
weight-only). Each has a ``ref_*`` twin in plain torch that defines its result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ir import qformat
from kiln.ir.record import record

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
PATHS = ("auto", "vnni", "amx")


def _C():
    from kiln import _C

    return _C


def capabilities() -> dict[str, bool]:
    """{'vnni': ..., 'amx': ..., 'int4': ...}: which kernels can run on this CPU and build."""
    return dict(_C().quant_capabilities())


def int8_path(m: int, path: str = "auto") -> str:
    """The path a GEMM with ``m`` rows takes: 'amx', 'vnni', or 'none' (cannot run here)."""
    return _C().int8_path(m, path)


def _np(t: torch.Tensor, dtype: torch.dtype, name: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got device {t.device}")
    return t.detach().contiguous().numpy()


def _threads(threads: int | None) -> int:
    return torch.get_num_threads() if threads is None else int(threads)


def _bias(bias: torch.Tensor | None):
    return None if bias is None else _np(bias, torch.float32, "bias")


def _out(out: torch.Tensor | None, dtype: torch.dtype, rows: int, n: int):
    """A caller's output tensor as a writable [rows, n] numpy view (None: the kernel allocates)."""
    if out is None:
        return None
    if not isinstance(out, torch.Tensor) or out.dtype != dtype or out.device.type != "cpu":
        raise TypeError(f"out: expected a CPU tensor of dtype {dtype}")
    if not out.is_contiguous() or out.numel() != rows * n or (out.dim() and out.shape[-1] != n):
        raise ValueError(f"out: expected a contiguous tensor of {rows} x {n} elements (last dim {n})")
    return out.detach().view(rows, n).numpy()


def _result(arr, out: torch.Tensor | None, lead: tuple[int, ...], n: int) -> torch.Tensor:
    return out if out is not None else torch.from_numpy(arr).reshape(*lead, n)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _rows(x: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x [..., K] -> ([M, K], leading shape)."""
    if x.dim() < 1:
        raise ValueError(f"{name}: expected at least one dimension")
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


# ---------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------

def prepack_int8(w_q: torch.Tensor, w_scale: torch.Tensor):
    """Prepack an int8 weight for ``qlinear_dynamic`` / ``qlinear_static`` / ``int8_gemm_s32``.

    w_q: int8 [N, K] (K <= 65536); w_scale: fp32 [N]. Returns an opaque
    ``kiln._C.Int8PackedWeight`` (attributes ``n``, ``k``, ``nbytes``) owning its own copy.
    """
    return _C().int8_prepack(_np(w_q, torch.int8, "w_q"), _np(w_scale, torch.float32, "w_scale"))


def int8_gemm_s32(x_q: torch.Tensor, packed, *, path: str = "auto", threads: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The exact int32 core: ``x_q.int() @ w_q.int().T`` for x_q uint8 [M, K] -> int32 [M, N]."""
    one, zero = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    m = x_q.shape[0] if x_q.dim() == 2 else -1
    res = _C().int8_gemm(_np(x_q, torch.uint8, "x_q"), packed, one.numpy(), zero.numpy(), None, "none", "s32",
                         1.0, 0, path, _threads(threads), _out(out, torch.int32, m, packed.n))
    return _result(res, out, (m,), packed.n)


def _qparam(v, m: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=dtype).reshape(-1)
    if t.numel() not in (1, m):
        raise ValueError(f"{name}: expected a scalar or {m} values (one per row), got {t.numel()}")
    return t.contiguous()


def qlinear_static(x_q: torch.Tensor, x_scale, x_zp, packed, bias: torch.Tensor | None = None,
                   activation: str = "none", *, out_scale: float | None = None, out_zp: int = 0,
                   path: str = "auto", threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 linear on already quantized activations (static quantization chains).

    x_q: uint8 [..., K]; x_scale (float) and x_zp (int) per tensor, or tensors of one value
    per row. Computes ``y = act(x_scale * w_scale[n] * (x_q @ w_q^T - x_zp * w_q.sum(1)) + bias)``
    and returns fp32 [..., N], or, when ``out_scale`` is given, the requantized uint8
    ``clamp(round(y * (1 / out_scale)) + out_zp, 0, 255)`` (fp32 reciprocal, ties to even).
    ``out``: optional preallocated contiguous result (fp32 or uint8, [..., N]; must not
    overlap x_q), written and returned.
    """
    _check_activation(activation)
    x2, lead = _rows(x_q, "x_q")
    m = x2.shape[0]
    xs = _qparam(x_scale, m, torch.float32, "x_scale")
    xz = _qparam(x_zp, m, torch.int32, "x_zp")
    if out_scale is None:
        res = _C().int8_gemm(_np(x2, torch.uint8, "x_q"), packed, xs.numpy(), xz.numpy(), _bias(bias), activation,
                             "f32", 1.0, 0, path, _threads(threads), _out(out, torch.float32, m, packed.n))
    else:
        res = _C().int8_gemm(_np(x2, torch.uint8, "x_q"), packed, xs.numpy(), xz.numpy(), _bias(bias), activation,
                             "u8", float(out_scale), int(out_zp), path, _threads(threads),
                             _out(out, torch.uint8, m, packed.n))
    return _result(res, out, lead, packed.n)


def quantize_per_row(x: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization (the C++ kernel; ``ref_quantize_per_row`` is its spec).

    x fp32 [M, K] -> (x_q uint8 [M, K], scale fp32 [M], zp int32 [M]).
    """
    q, s, z = _C().quantize_rows_u8(_np(x, torch.float32, "x"), _threads(threads))
    return torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(z)


def qlinear_dynamic(x: torch.Tensor, packed, bias: torch.Tensor | None = None, activation: str = "none", *,
                    path: str = "auto", threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic int8 linear (BERT's int8 linear layers): fp32 [..., K] -> fp32 [..., N].

    Each row of x is quantized to uint8 inside the kernel (``ref_quantize_per_row``), then
    ``y = act(scale[m] * w_scale[n] * (x_q @ w_q^T - zp[m] * w_q.sum(1)) + bias)``.
    ``out``: optional preallocated contiguous fp32 result [..., N], written and returned.
    """
    _check_activation(activation)
    x2, lead = _rows(x, "x")
    res = _C().qlinear_dynamic(_np(x2, torch.float32, "x"), packed, _bias(bias), activation, path, _threads(threads),
                               _out(out, torch.float32, x2.shape[0], packed.n))
    return _result(res, out, lead, packed.n)


def qlinear_dynamic_runner(packed, bias: torch.Tensor | None = None):
    """``qlinear_dynamic`` for one weight and bias, as a compiled plan calls it: the checks
    and conversions that do not depend on the input are done here, once, so a call costs
    the kernel and little else. Returns ``run(x, activation) -> y`` for fp32 CPU x [..., K]."""
    call, n = _C().qlinear_dynamic, packed.n
    bias_np = _bias(bias)

    def run(x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if x2.requires_grad:
            x2 = x2.detach()
        y = torch.empty(x2.shape[0], n)
        call(x2.numpy(), packed, bias_np, activation, "auto", torch.get_num_threads(), y.numpy())
        return y.view(*x.shape[:-1], n)
    return run


# ---------------------------------------------------------------------------------------
# int8 conv2d (NHWC): im2col + the int8 GEMM with its fused epilogue
# ---------------------------------------------------------------------------------------

@record(slots=False)
class Int8Conv:
    """A conv weight prepacked for ``qconv2d_nhwc``: the GEMM weight is [OC, KH * KW * C]
    with k ordered (kh, kw, c), matching the NHWC patches."""

    packed: object
    out_channels: int
    in_channels: int
    kernel: tuple[int, int]


def prepack_conv_int8(w_q: torch.Tensor, w_scale: torch.Tensor) -> Int8Conv:
    """w_q int8 [OC, C, KH, KW] (torch's layout), per-output-channel w_scale fp32 [OC]."""
    if w_q.dim() != 4:
        raise ValueError("w_q: expected shape (OC, C, KH, KW)")
    oc, c, kh, kw = w_q.shape
    return Int8Conv(prepack_int8(w_q.permute(0, 2, 3, 1).reshape(oc, kh * kw * c), w_scale), oc, c, (kh, kw))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _patches_nhwc(x_q: torch.Tensor, x_zp: int, kernel, stride, padding) -> tuple[torch.Tensor, int, int]:
    """[N, H, W, C] uint8 -> ([N * OH * OW, KH * KW * C], OH, OW); padding holds the zero point
    (the quantized 0.0), so padded taps add nothing after the zero-point correction."""
    n, h, w, c = x_q.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:
        padded = torch.full((n, h + 2 * ph, w + 2 * pw, c), x_zp, dtype=torch.uint8)
        padded[:, ph:ph + h, pw:pw + w] = x_q
        x_q, h, w = padded, h + 2 * ph, w + 2 * pw
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    if (kh, kw) == (1, 1):
        cols = x_q[:, ::sh, ::sw][:, :oh, :ow]
        return cols.reshape(n * oh * ow, c), oh, ow
    x_q = x_q.contiguous()
    sn, sh_, sw_, sc = x_q.stride()
    view = x_q.as_strided((n, oh, ow, kh, kw, c), (sn, sh_ * sh, sw_ * sw, sh_, sw_, sc))
    return view.reshape(n * oh * ow, kh * kw * c), oh, ow


def qconv2d_nhwc(x_q: torch.Tensor, x_scale: float, x_zp: int, conv: Int8Conv, bias: torch.Tensor | None = None,
                 activation: str = "none", *, stride=1, padding=0, out_scale: float | None = None, out_zp: int = 0,
                 path: str = "auto", threads: int | None = None) -> torch.Tensor:
    """int8 conv2d on NHWC uint8 activations (per-tensor x_scale / x_zp), groups = 1, no dilation.

    Same epilogue as ``qlinear_static``: fp32 [N, OH, OW, OC], or uint8 requantized with
    (out_scale, out_zp) for the next int8 layer. 1x1 stride-1 convs read x_q in place;
    others gather patches (im2col) first.
    """
    if x_q.dim() != 4 or x_q.shape[-1] != conv.in_channels:
        raise ValueError(f"x_q: expected shape (N, H, W, {conv.in_channels})")
    if x_q.dtype != torch.uint8:
        raise TypeError(f"x_q: expected dtype torch.uint8, got {x_q.dtype}")
    cols, oh, ow = _patches_nhwc(x_q, int(x_zp), conv.kernel, _pair(stride), _pair(padding))
    y = qlinear_static(cols, x_scale, x_zp, conv.packed, bias, activation, out_scale=out_scale, out_zp=out_zp,
                       path=path, threads=threads)
    return y.reshape(x_q.shape[0], oh, ow, conv.out_channels)


def ref_qconv2d_nhwc(x_q, x_scale, x_zp, w_q, w_scale, bias=None, activation="none", *, stride=1, padding=0,
                     out_scale=None, out_zp=0):
    """Reference of ``qconv2d_nhwc`` (unpacked w_q [OC, C, KH, KW]): exact integer conv in
    float64, then the same fp32 epilogue as ``ref_qlinear_static``."""
    xc = x_q.permute(0, 3, 1, 2).double() - int(x_zp)
    acc = F.conv2d(xc, w_q.double(), stride=_pair(stride), padding=_pair(padding))
    acc = acc.permute(0, 2, 3, 1).to(torch.int32)
    y = acc.float() * (torch.tensor(x_scale, dtype=torch.float32) * w_scale)
    return _ref_epilogue(y, bias, activation, out_scale, out_zp)


# ---------------------------------------------------------------------------------------
# int4 weight-only
# ---------------------------------------------------------------------------------------

def prepack_int4(w_packed: torch.Tensor, scales: torch.Tensor, group_size: int | None = None):
    """Prepack an int4 weight: w_packed uint8 [N, K // 2], scales fp32 [N, K // G].

    ``group_size`` defaults to K // scales.shape[1] and must be in ``qformat.INT4_GROUP_SIZES``.
    Returns an opaque ``kiln._C.Int4PackedWeight`` (attributes ``n``, ``k``, ``group``).
    """
    if scales.dim() != 2 or scales.shape[1] == 0:
        raise ValueError("scales: expected shape (N, K // group_size)")
    k = 2 * w_packed.shape[-1]
    g = qformat.int4_group_size(k, scales) if group_size is None else int(group_size)
    return _C().int4_prepack(_np(w_packed, torch.uint8, "w_packed"), _np(scales, torch.float32, "scales"), g)


def linear_int4(x: torch.Tensor, packed, bias: torch.Tensor | None = None, activation: str = "none", *,
                threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """int4 weight-only linear: ``act(x @ (q * scales)^T + bias)``, x fp32 [..., K] -> fp32 [..., N].

    Accumulates in fp32: each group's partial sum is scaled once (few rows), or the weights
    are dequantized to fp32 in blocks (16 rows and more); either way equal to the reference
    up to fp32 rounding. ``out``: optional preallocated contiguous fp32 result [..., N].
    """
    _check_activation(activation)
    x2, lead = _rows(x, "x")
    res = _C().linear_int4(_np(x2, torch.float32, "x"), packed, _bias(bias), activation, _threads(threads),
                           _out(out, torch.float32, x2.shape[0], packed.n))
    return _result(res, out, lead, packed.n)


# ---------------------------------------------------------------------------------------
# References (pure torch): the specification of each kernel above
# ---------------------------------------------------------------------------------------

def ref_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    _check_activation(activation)
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    return y


def _ref_epilogue(y, bias, activation: str, out_scale, out_zp):
    """bias, activation, then (with an output scale) requantization to uint8: the fp32
    epilogue every int8 reference shares."""
    if bias is not None:
        y = y + bias
    y = ref_activation(y, activation)
    if out_scale is not None:  # the kernels take the reciprocal of the fp32 output scale
        y = qformat.quantize_tensor(y, torch.tensor(out_scale, dtype=torch.float32), out_zp)
    return y


def ref_int8_gemm_s32(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact x_q @ w_q^T in int32 (float64 holds every partial sum exactly for K <= 65536)."""
    return (x_q.double() @ w_q.double().T).to(torch.int32)


def ref_quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C++ kernels' dynamic quantization rule (``quantize_per_row``), in fp32: per row,
    the range [min(x, 0), max(x, 0)] maps onto [0, 255]: scale = (max - min) / 255 (1 where
    that is 0), zp = round(-min / scale) clamped to [0, 255], x_q = clamp(round(x * (1 / scale))
    + zp, 0, 255); round = ties to even.

    Returns (x_q uint8 [M, K], scale fp32 [M], zp int32 [M]). The values are
    ``qformat.quantize_rows``'s except in rows whose whole range is under 255e-8, where
    quantize_rows raises the scale to 1e-8 and this rule keeps it (an all-zero row gives
    x_q = 0 and zp = 0 under both, with scale 1 here).
    """
    x = x.float()
    mn = x.amin(dim=1).clamp(max=0)
    mx = x.amax(dim=1).clamp(min=0)
    scale = (mx - mn) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inv = 1.0 / scale
    zp = torch.round(-mn / scale).clamp(0, 255)
    q = (torch.round(x * inv[:, None]) + zp[:, None]).clamp(0, 255)
    return q.to(torch.uint8), scale, zp.to(torch.int32)


def ref_qlinear_static(x_q, x_scale, x_zp, w_q, w_scale, bias=None, activation="none", out_scale=None, out_zp=0):
    """Reference of ``qlinear_static`` (same arguments, but the unpacked w_q / w_scale)."""
    x2, lead = _rows(x_q, "x_q")
    m = x2.shape[0]
    xs = _qparam(x_scale, m, torch.float32, "x_scale").reshape(-1, 1)
    xz = _qparam(x_zp, m, torch.int32, "x_zp").reshape(-1, 1)
    acc = ref_int8_gemm_s32(x2, w_q)
    exact = acc - xz * w_q.to(torch.int32).sum(dim=1)[None, :]
    y = exact.float() * (xs * w_scale[None, :])
    return _ref_epilogue(y, bias, activation, out_scale, out_zp).reshape(*lead, w_q.shape[0])


def ref_qlinear_dynamic(x, w_q, w_scale, bias=None, activation="none"):
    """Reference of ``qlinear_dynamic``: ref_quantize_per_row, then ref_qlinear_static."""
    x2, lead = _rows(x, "x")
    q, s, z = ref_quantize_per_row(x2)
    return ref_qlinear_static(q, s, z, w_q, w_scale, bias, activation).reshape(*lead, w_q.shape[0])


def ref_linear_int4(x, w_packed, scales, bias=None, activation="none"):
    """Reference of ``linear_int4``: dequantize (q * scale) to fp32, then an fp32 linear."""
    k = 2 * w_packed.shape[1]
    w = qformat.dequantize_weight_int4(w_packed, scales, qformat.int4_group_size(k, scales))
    return ref_activation(F.linear(x.float(), w, bias), activation)

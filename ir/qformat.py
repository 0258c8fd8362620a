"""Kiln's quantized tensor formats, defined once: what the stored integers and scales mean.

The quantization passes produce weights with these functions, the reference kernels read
them back with them, and every fast kernel (oneDNN and C++ on ``cpu``, Triton on ``cuda``)
takes its operands in exactly this format. A kernel that wants its own memory layout
(the C++ kernels' VNNI/AMX panels, torch's int4pack) builds it from this one when the plan
is built; the values stay the ones defined here.

Weights are symmetric (no zero point) with fp32 scales:

- int8: int8 ``[N, ...]``, values in [-127, 127] (-128 is never produced), one scale per
  output channel (axis 0): ``w ~= w_q * scale[n]``. Conv weights ``[OC, C, KH, KW]`` too.
- int4: values in [-8, 7] (the quantizer uses [-7, 7]), two per byte as uint8
  ``[N, K // 2]``: k = 2j in the low nibble of byte j, k = 2j + 1 in the high nibble, two's
  complement; one scale per group of G consecutive k, ``[N, K // G]``, G in
  ``INT4_GROUP_SIZES``: ``w[n, k] ~= q[n, k] * scale[n, k // G]``.

Activations are asymmetric uint8, ``x ~= (x_q - zero_point) * scale``, with the range
widened to include 0 so that 0.0 is exact (zero padding stays zero): per tensor from
calibration for static int8 (``per_tensor_qparams``), per row (token) at run time for
dynamic int8 (``quantize_rows``).
"""
from __future__ import annotations

import torch

from kiln.options import INT4_GROUP_SIZES  # noqa: F401  (the group sizes users may ask for are exactly
# the ones the int4 kernels support: defined once, with the other option values)

INT8_QMAX = 127  # int8 weights use [-INT8_QMAX, INT8_QMAX]
INT4_QMIN, INT4_QMAX = -8, 7  # what a nibble holds; the quantizer uses [-INT4_QMAX, INT4_QMAX]
EPS = 1e-12  # smallest weight scale (an all-zero channel or group)


# ----------------------------------------------------------------------------- int8 weights
def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (axis 0) int8: returns (w_q int8, scale float32 [N])."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = (flat.abs().amax(1) / INT8_QMAX).clamp(min=EPS)
    q = torch.round(flat / scale[:, None]).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q.reshape(w.shape).contiguous(), scale.contiguous()


def dequantize_weight_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.reshape((-1,) + (1,) * (q.dim() - 1))


# ----------------------------------------------------------------------------- int4 weights
def int4_shapes(n: int, k: int, group_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of an int4 weight of [N, K] with groups of ``group_size``: (packed, scales)."""
    return (n, k // 2), (n, k // group_size)


def int4_group_size(k: int, scales: torch.Tensor) -> int:
    """The group size of int4 scales [N, K // G] for a weight of K columns."""
    return k // scales.shape[1]


def quantize_weight_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric int4 along K: returns (packed uint8 [N, K // 2], scales [N, K // G])."""
    n, k = w.shape
    if k % group_size or k % 2:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    g = w.detach().float().reshape(n, k // group_size, group_size)
    scale = (g.abs().amax(2) / INT4_QMAX).clamp(min=EPS)  # symmetric: -8 is never produced
    q = torch.round(g / scale[:, :, None]).clamp(INT4_QMIN, INT4_QMAX).to(torch.int8).reshape(n, k)
    return pack_int4(q), scale.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-8, 7], [N, K] (K even), any integer dtype -> uint8 [N, K // 2]."""
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K] in [-8, 7]."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    q = torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)
    return torch.where(q >= 8, q - 16, q)


def dequantize_weight_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_int4(packed).float()
    return q * scale.repeat_interleave(group_size, dim=1)


# ----------------------------------------------------------------------------- uint8 activations
def per_tensor_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 (scale, zero point) covering [lo, hi] (widened to include 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zp = int(min(255, max(0, round(-lo / scale))))
    return scale, zp


def quantize_tensor(x: torch.Tensor, scale, zero_point: int) -> torch.Tensor:
    """``clamp(round(x * (1 / scale)) + zero_point, 0, 255)`` as uint8, ties to even.

    ``scale`` a Python float: the reciprocal is taken in double (the reference kernels); a
    float32 tensor: in float32 (what the C++ kernels compute when they requantize).
    """
    return torch.round(x * (1.0 / scale)).add_(zero_point).clamp_(0, 255).to(torch.uint8)


def dequantize_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.float() - zero_point) * scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic per-row asymmetric uint8 over the last axis: (x_q, scale [..., 1], zero_point [..., 1]).

    The range of each row is widened to include 0 (so 0 is exact); scales are at least
    1e-8; zero points are whole numbers kept as float32.
    """
    # amin/amax, not aminmax: torch's aminmax along a dim is far slower on CPU
    lo = x.amin(-1, keepdim=True).clamp_(max=0)
    hi = x.amax(-1, keepdim=True)
    scale = (hi.clamp(min=0) - lo).div_(255.0).clamp_(min=1e-8)
    zp = torch.round(-lo / scale).clamp_(0, 255)
    q = torch.round(x * (1.0 / scale)).add_(zp).clamp_(0, 255).to(torch.uint8)
    return q, scale, zp


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    ref = ref.double()
    noise = float((ref - approx.double()).pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(torch.log10(torch.tensor(max(signal, 1e-300) / noise)))

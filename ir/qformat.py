"""The quantized tensor formats every Kiln quantized kernel shares, as torch functions.

Passes use them to produce weights, reference kernels to read them back, fast kernels to
quantize activations bit-for-bit as the reference does (so the kernel choice's numerics
check compares like with like).

- int8 weight: int8 [N, K], symmetric per output channel, values in [-127, 127];
  ``w ~= w_q * scale[:, None]``.
- int4 weight: values in [-8, 7] packed two per byte as uint8 [N, K // 2] (k = 2j in the
  low nibble of byte j, k = 2j + 1 in the high nibble, two's complement); scales float32
  [N, K // G]: ``w[n, k] ~= q[n, k] * scale[n, k // G]``.
- activations: asymmetric uint8, ``x ~= (x_q - zero_point) * scale``; per row (token) at
  run time for dynamic int8, per tensor from calibration for static int8.
"""
from __future__ import annotations

import torch

QMAX8 = 127
EPS = 1e-12


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (axis 0) int8: returns (w_q int8, scale float32 [N])."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = (flat.abs().amax(1) / QMAX8).clamp(min=EPS)
    q = torch.round(flat / scale[:, None]).clamp(-QMAX8, QMAX8).to(torch.int8)
    return q.reshape(w.shape).contiguous(), scale.contiguous()


def dequantize_weight_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.reshape((-1,) + (1,) * (q.dim() - 1))


def quantize_weight_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric int4 along K: returns (packed uint8 [N, K // 2], scales [N, K // G])."""
    n, k = w.shape
    if k % group_size or k % 2:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    g = w.detach().float().reshape(n, k // group_size, group_size)
    scale = (g.abs().amax(2) / 7).clamp(min=EPS)  # symmetric: [-7, 7] used, -8 never produced
    q = torch.round(g / scale[:, :, None]).clamp(-8, 7).to(torch.int8).reshape(n, k)
    return pack_int4(q), scale.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
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


def per_tensor_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 (scale, zero point) covering [lo, hi] (widened to include 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zp = int(min(255, max(0, round(-lo / scale))))
    return scale, zp


def quantize_tensor(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.round(x * (1.0 / scale)).add_(zero_point).clamp_(0, 255).to(torch.uint8)


def dequantize_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.float() - zero_point) * scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic per-row asymmetric uint8 over the last axis: (x_q, scale [..., 1], zero_point [..., 1]).

    The range of each row is widened to include 0 (so 0 is exact); zero points are whole
    numbers kept as float32.
    """
    # amin/amax, not aminmax: torch's aminmax along a dim is ~100x slower on CPU
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

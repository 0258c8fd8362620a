"""Tensors as the C++ kernels take them: numpy views (bf16 as its int16 bits), NHWC for channels-last."""
from __future__ import annotations

import torch


def as_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when already stored channels-last, else a channels-last copy."""
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def nhwc_array(t: torch.Tensor):
    """The NHWC numpy view of a channels-last tensor (bf16 as its int16 bits); no copy."""
    v = t.permute(0, 2, 3, 1)
    return (v.view(torch.int16) if t.dtype == torch.bfloat16 else v).numpy()


def native_array(t: torch.Tensor):
    """The numpy view of ``t`` (bf16 as its int16 bits), unit stride along the last dim."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()

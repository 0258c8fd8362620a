"""Element types, including the quantized and packed types later passes produce."""
from __future__ import annotations

import enum

import torch

from kiln.errors import KilnError
from .record import record


class DTypeError(KilnError, TypeError):
    """A torch dtype Kiln has no element type for (a KilnError: the user's model uses it)."""


class DType(enum.Enum):
    """Element type of a tensor value.

    ``INT4`` is packed two values per byte (low nibble first); its tensors carry a
    ``QuantSpec`` saying how to read them back as real numbers. Complex values flow
    through a graph (inputs, outputs, FALLBACK nodes: FFTs and whatever consumes them run
    in PyTorch); no Kiln op computes on them.
    """

    FLOAT64 = "float64"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT64 = "int64"
    INT32 = "int32"
    INT16 = "int16"
    INT8 = "int8"
    UINT8 = "uint8"
    INT4 = "int4"
    BOOL = "bool"
    COMPLEX64 = "complex64"
    COMPLEX128 = "complex128"

    def __repr__(self) -> str:
        return self.value

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_complex(self) -> bool:
        return self in (DType.COMPLEX64, DType.COMPLEX128)

    @property
    def is_int(self) -> bool:
        return self in _INTS

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def itemsize(self) -> float:
        """Bytes per element (0.5 for packed int4)."""
        return _BITS[self] / 8

    def to_torch(self) -> torch.dtype:
        if self is DType.INT4:
            return torch.uint8  # packed storage
        return _TO_TORCH[self]

    @staticmethod
    def from_torch(dt: torch.dtype) -> "DType":
        try:
            return _FROM_TORCH[dt]
        except KeyError:
            raise DTypeError(f"Kiln has no element type for {dt}") from None

    @staticmethod
    def parse(name: str) -> "DType":
        try:
            return DType(name)
        except ValueError:
            raise TypeError(f"unknown dtype {name!r}") from None


_FLOATS = {DType.FLOAT64, DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16}
_INTS = {DType.INT64, DType.INT32, DType.INT16, DType.INT8, DType.UINT8, DType.INT4}
_BITS = {DType.FLOAT64: 64, DType.FLOAT32: 32, DType.FLOAT16: 16, DType.BFLOAT16: 16, DType.INT64: 64,
         DType.INT32: 32, DType.INT16: 16, DType.INT8: 8, DType.UINT8: 8, DType.INT4: 4, DType.BOOL: 8,
         DType.COMPLEX64: 64, DType.COMPLEX128: 128}
_TO_TORCH = {DType.FLOAT64: torch.float64, DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16,
             DType.BFLOAT16: torch.bfloat16, DType.INT64: torch.int64, DType.INT32: torch.int32,
             DType.INT16: torch.int16, DType.INT8: torch.int8, DType.UINT8: torch.uint8, DType.BOOL: torch.bool,
             DType.COMPLEX64: torch.complex64, DType.COMPLEX128: torch.complex128}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}


class QScheme(enum.Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"  # group-wise along the reduction axis (int4 weights)
    PER_TOKEN = "per_token"  # dynamic, computed at run time per row


@record
class QuantSpec:
    """How an integer tensor maps to real numbers: ``real = (q - zero_point) * scale``.

    Per-tensor scales live inline; per-channel/group scales are graph constants named by
    ``scale_ref``/``zero_ref`` so they are stored, hashed and serialized like weights.
    """

    scheme: QScheme
    scale: float | None = None
    zero_point: int = 0
    axis: int | None = None
    group_size: int | None = None
    scale_ref: str | None = None
    zero_ref: str | None = None

"""Tensor types: dtype, shape with symbolic dims, memory layout and quantization."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

from .dtypes import DType, QuantSpec


@dataclass(frozen=True, slots=True, order=True)
class Sym:
    """A named symbolic dimension (``batch``, ``seq``): one compiled graph serves many sizes."""

    name: str

    def __repr__(self) -> str:
        return self.name


Dim = Union[int, Sym]


class LayoutKind(enum.Enum):
    ROW_MAJOR = "row_major"  # contiguous in the logical order (NCHW for 4-D activations)
    CHANNELS_LAST = "channels_last"  # NHWC storage of a logical NCHW tensor
    BLOCKED = "blocked"  # NCHW{c}c: channels split into blocks of `block` innermost
    SPARSE_CSR = "csr"
    SPARSE_BSR = "bsr"
    SPARSE_24 = "2:4"


@dataclass(frozen=True, slots=True)
class Layout:
    kind: LayoutKind = LayoutKind.ROW_MAJOR
    block: tuple[int, ...] = ()

    def __repr__(self) -> str:
        if self.kind is LayoutKind.ROW_MAJOR:
            return ""
        short = {LayoutKind.CHANNELS_LAST: "nhwc", LayoutKind.BLOCKED: "nchwc"}.get(self.kind, self.kind.value)
        return f"{short}{list(self.block) if self.block else ''}"


ROW_MAJOR = Layout()


@dataclass(frozen=True, slots=True)
class TensorType:
    dtype: DType
    shape: tuple[Dim, ...]
    layout: Layout = field(default=ROW_MAJOR)
    quant: QuantSpec | None = None

    def __post_init__(self):
        if not isinstance(self.dtype, DType):
            raise TypeError(f"TensorType.dtype must be a DType, got {self.dtype!r}")
        shape = tuple(self.shape)
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, (int, Sym)) or (isinstance(d, int) and d < 0):
                raise TypeError(f"bad dim {d!r} in shape {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            if not isinstance(d, int):
                raise ValueError(f"numel of symbolic shape {self.shape}")
            n *= d
        return n

    def nbytes(self) -> int:
        return int(self.numel() * self.dtype.itemsize + 0.5)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape), self.layout, self.quant)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape, self.layout, self.quant)

    def __repr__(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        s = f"{self.dtype.value}[{dims}]"
        if self.layout != ROW_MAJOR:
            s += f"@{self.layout!r}"
        if self.quant is not None:
            s += f"{{{self.quant.scheme.value}}}"
        return s


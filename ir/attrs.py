"""Typed, frozen attribute records for every op kind (never ``dict[str, Any]``)."""
from __future__ import annotations

import enum

from .record import record

from .dtypes import DType
from .types import Layout, TensorType


@record
class NoAttrs:
    """Attributes of an op that has none."""


class GeluApprox(enum.Enum):
    NONE = "none"
    TANH = "tanh"


@record
class GeluAttrs:
    """GELU: exact or tanh-approximated."""
    approximate: GeluApprox = GeluApprox.NONE


@record
class ClampAttrs:
    """Clamp: lower and upper bounds (None: unbounded)."""
    min: float | None = None
    max: float | None = None


@record
class LeakyReluAttrs:
    """Leaky ReLU: the negative slope."""
    alpha: float = 0.01


class Rounding(enum.Enum):
    NONE = "none"  # true division (float result)
    TRUNC = "trunc"  # toward zero (C, ONNX integer Div)
    FLOOR = "floor"  # toward -inf (Python //)


@record
class DivAttrs:
    """Division: true, truncating or flooring."""
    rounding: Rounding = Rounding.NONE


@record
class CastAttrs:
    """Cast: the result dtype."""
    dtype: DType


@record
class ReduceAttrs:
    """A reduction: its axes and whether they are kept."""
    axes: tuple[int, ...]  # normalized, sorted, non-negative
    keepdim: bool = False


@record
class ArgReduceAttrs:
    """argmax / argmin: the axis and whether it is kept."""
    axis: int
    keepdim: bool = False


@record
class AxisAttrs:
    """An op over one axis (softmax, concat, ...)."""
    axis: int  # normalized, non-negative


@record
class LayerNormAttrs:
    """Layer norm: how many trailing dims are normalized, and epsilon."""
    normalized_ndim: int = 1  # normalize over the last n axes
    eps: float = 1e-5


@record
class BatchNormAttrs:
    """Batch norm (inference): epsilon."""
    eps: float = 1e-5


class Activation(enum.Enum):
    """An activation fused into a GEMM/conv epilogue: ``act(op(x) + bias + residual)``."""

    NONE = "none"
    RELU = "relu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    SILU = "silu"
    RELU6 = "relu6"  # clamp(x, 0, 6) (MobileNets); fused into CPU float convolutions only


@record
class LinearAttrs:
    """Linear layer: the activation fused into it."""
    activation: Activation = Activation.NONE


@record
class Conv2dAttrs:
    """2-D convolution: stride, padding, dilation, groups, fused activation."""
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    activation: Activation = Activation.NONE


@record
class LayoutAttrs:
    """TO_LAYOUT: the same logical tensor, stored in ``layout``."""

    layout: Layout


@record
class Pool2dAttrs:
    """2-D pooling window: kernel, stride, padding, dilation, rounding, padding in averages."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = True


@record
class AdaptivePoolAttrs:
    """Adaptive pooling: the output size."""
    output_size: tuple[int, int]


@record
class ShapeAttrs:
    """Target shape of RESHAPE / EXPAND (fully resolved: no -1)."""

    shape: tuple[int, ...]


@record
class PermuteAttrs:
    """Permute: the new order of the dims."""
    perm: tuple[int, ...]


@record
class SliceAttrs:
    """Slice: axis, start, end, step."""
    axis: int
    start: int
    end: int
    step: int = 1


class PadMode(enum.Enum):
    CONSTANT = "constant"
    REFLECT = "reflect"
    REPLICATE = "replicate"


@record
class PadAttrs:
    """Pad: amounts per side, mode and fill value."""
    pads: tuple[int, ...]  # (before, after) per axis, from axis 0
    mode: PadMode = PadMode.CONSTANT
    value: float = 0.0


@record
class AttentionAttrs:
    """softmax(q @ k^T * scale + mask) @ v; ``scale=None`` means 1/sqrt(head_dim)."""

    scale: float | None = None
    causal: bool = False


@record
class RNNAttrs:
    """Structured LSTM/GRU over a whole sequence (torch gate order: LSTM i,f,g,o; GRU r,z,n).

    Inputs: x, h0, [c0 for LSTM], then per layer and direction: w_ih, w_hh, [b_ih, b_hh].
    ``proj_hoisted``: the input projection was hoisted out of the recurrence into one GEMM
    over all time steps. Then the op is one unidirectional layer whose inputs are
    (xp, h0, [c0], w_hh, [b_hh]) with xp = x @ w_ih^T + b_ih (for LSTM b_hh is folded into
    xp too and absent).
    """

    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    has_biases: bool = True
    proj_hoisted: bool = False


@record
class FallbackAttrs:
    """An op Kiln does not compile: run ``target`` (a torch op's qualified name) eagerly.

    ``args`` is the call's argument template; ``("$", i)`` marks the i-th tensor input,
    every other leaf is a literal. ``kwargs`` is a tuple of (name, template) pairs.
    """

    target: str
    args: tuple
    kwargs: tuple
    out_types: tuple[TensorType, ...]
    reason: str = ""


@record
class SparseLinearAttrs:
    """SPARSE_LINEAR: LINEAR whose constant weight (dense shape ``shape`` = (out, in)) is
    stored compressed in ``layout``: CSR and BSR as (values, column indices, row pointers),
    2:4 as (the two kept values per group of four, their int8 positions in the group)."""

    layout: Layout
    shape: tuple[int, int]
    activation: Activation = Activation.NONE


@record
class SparseConv2dAttrs:
    """SPARSE_CONV2D: CONV2D (groups 1) whose weight (dense ``shape`` = (co, ci, kh, kw)) is
    stored as a sparse [co, ci*kh*kw] matrix in ``layout``, run as im2col x sparse GEMM."""

    layout: Layout
    shape: tuple[int, int, int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    activation: Activation = Activation.NONE


# ----------------------------------------------------------------------------- quantization
# Formats: see the quantized weight formats in the README (int8 weights symmetric per output
# channel; int4 group-wise, two per byte, low nibble first; activations asymmetric uint8).
@record
class QuantizeAttrs:
    """QUANTIZE (float32 -> uint8) and DEQUANTIZE (uint8 -> float32), one scale per tensor:
    ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int = 0


@record
class QLinearDynamicAttrs:
    """QLINEAR_DYNAMIC: activations quantized per row at run time (asymmetric uint8),
    weights int8 per output channel; epilogue ``act(y + bias + residual)`` in float32."""

    activation: Activation = Activation.NONE


@record
class WeightOnlyAttrs:
    """LINEAR_WEIGHT_ONLY: float activations, integer weights. ``bits=8``: int8 [N, K] with
    one scale per output channel; ``bits=4``: uint8 [N, K // 2] (two values per byte) with
    scales [N, K // group_size]."""

    bits: int = 8
    group_size: int = 0
    activation: Activation = Activation.NONE


@record
class QLinearAttrs:
    """QLINEAR (static int8): uint8 input quantized with (x_scale, x_zero_point) from
    calibration. ``out_scale=None``: float32 output; else uint8 output requantized with
    (out_scale, out_zero_point) after bias and activation."""

    x_scale: float
    x_zero_point: int
    out_scale: float | None = None
    out_zero_point: int = 0
    activation: Activation = Activation.NONE


@record
class QConv2dAttrs:
    """QCONV2D (static int8): as QLINEAR, for a convolution. A residual operand has the
    output's dtype; a uint8 residual carries (residual_scale, residual_zero_point)."""

    x_scale: float
    x_zero_point: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    out_scale: float | None = None
    out_zero_point: int = 0
    activation: Activation = Activation.NONE
    residual_scale: float | None = None
    residual_zero_point: int = 0


# ----------------------------------------------------------------------------- library ops
# (ops that run a library kernel of their own: sorting, scatters, 3-D pooling, distances,
# sampling; defined in ir/ops_library.py)
@record
class SortAttrs:
    """SORT: the axis and the direction. Stable: equal elements keep their order; unstable:
    ties in whatever order torch's kernel leaves them (the values are the same either way)."""
    axis: int
    descending: bool = False
    stable: bool = True


@record
class TopKAttrs:
    """TOPK: the k largest (or smallest) along an axis, sorted or in torch's unsorted order."""
    k: int
    axis: int
    largest: bool = True
    sorted: bool = True


class ScatterReduce(enum.Enum):
    NONE = "none"  # assignment (duplicate indices: the last write wins, as torch's CPU kernel)
    SUM = "sum"
    PROD = "prod"
    MEAN = "mean"
    AMAX = "amax"
    AMIN = "amin"


@record
class ScatterAttrs:
    """SCATTER: src's elements written (or reduced) into data at indices along an axis."""
    axis: int
    reduce: ScatterReduce = ScatterReduce.NONE
    include_self: bool = True


@record
class IndexPutAttrs:
    """INDEX_PUT: ``data[idx...] = values`` (or ``+=`` with accumulate); ``axes`` are the
    dims the index tensors index, in order (the others are taken whole)."""
    axes: tuple[int, ...]
    accumulate: bool = False


@record
class Pool3dAttrs:
    """3-D pooling window (max and average), as torch's max_pool3d / avg_pool3d."""
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int] = (0, 0, 0)
    dilation: tuple[int, int, int] = (1, 1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None


@record
class AdaptivePool3dAttrs:
    """3-D adaptive average pooling: the output size."""
    output_size: tuple[int, int, int]


@record
class DistAttrs:
    """CDIST / PDIST: the p of the p-norm; cdist's compute_mode as torch takes it (None,
    0: matrix products for p = 2 when a side has more than 25 rows, 1: always, 2: never)."""
    p: float = 2.0
    compute_mode: int | None = None


@record
class EmbeddingBagAttrs:
    """EMBEDDING_BAG: mode 0 sum, 1 mean, 2 max (torch's codes), per bag of offsets."""
    mode: int = 0
    include_last_offset: bool = False
    padding_idx: int = -1


@record
class GridSampleAttrs:
    """GRID_SAMPLE (2-D), torch's codes: interpolation 0 bilinear, 1 nearest, 2 bicubic;
    padding 0 zeros, 1 border, 2 reflection."""
    interpolation: int = 0
    padding: int = 0
    align_corners: bool = False


@record
class GroupNormAttrs:
    """GROUP_NORM: the channels (axis 1) in ``groups`` groups, each normalized over its
    channels and every position (biased variance), then the optional per-channel affine and
    the activation (the epilogue pass fuses a following ReLU). Computed in float32 whatever
    the input's dtype, the result rounded once to it."""
    groups: int
    eps: float = 1e-5
    activation: Activation = Activation.NONE


@record
class Col2ImAttrs:
    """COL2IM (F.fold): sliding-window columns summed back into an image."""
    output_size: tuple[int, int]
    kernel: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    stride: tuple[int, int] = (1, 1)

"""The converters of frontends/aten_extended.py and aten_movement.py, op by op: each compiles
with no fallback and matches eager (float32; a few in bfloat16 and int64 too).

Every entry names the model family that needed it where one did (the model suite:
``kiln bench suite``); the rest cover PyTorch's Core ATen opset."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.ir import OpKind

F32, BF16, I64 = torch.float32, torch.bfloat16, torch.int64
W = "weight"  # marks an input that is a module parameter (a constant to Kiln), not a graph input


def _mk(shape, dtype=F32, kind="randn"):
    if kind.startswith("int"):
        hi = int(kind[3:] or 5)
        return torch.randint(0, hi, shape)
    if kind == "bool":
        return torch.rand(shape) > 0.5
    t = torch.randn(shape)
    if kind == "positive":
        t = t.abs() + 0.1
    elif kind == "unit":  # inside (-1, 1)
        t = torch.rand(shape) * 1.9 - 0.95
    elif kind == "above1":
        t = t.abs() + 1.0
    return t.to(dtype)


# (name, function, input specs: (shape, kind) or (shape, kind, "weight"), dtypes)
OPS = [
    # model suite: XLM-R / MPNet / OPT position ids
    ("cumsum", lambda x: (x != 1).int().cumsum(1) * 2, [((2, 9), "int3")], (I64,)),
    ("cumsum_float", lambda x: x.cumsum(-1), [((3, 7), "randn")], (F32, BF16)),
    # MPNet relative buckets; aliases torch.export keeps
    ("min_max_other", lambda a, b: torch.min(a, b) + torch.max(a, b), [((3, 4), "randn")] * 2, (F32, I64)),
    ("multiply_subtract_divide", lambda a, b: torch.divide(torch.multiply(a, b), torch.subtract(a, 5.0)),
     [((3, 4), "randn")] * 2, (F32,)),
    # conv1d: SqueezeBERT, ConvBERT, Wav2Vec2, HuBERT, Whisper; string padding: EfficientNet-style
    ("conv1d", lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1), [((2, 4, 11), "randn"),
                                                                          ((6, 4, 3), "randn", W), ((6,), "randn", W)],
     (F32, BF16)),
    ("conv1d_groups_dilation", lambda x, w: F.conv1d(x, w, None, 1, 2, 2, 2), [((1, 4, 9), "randn"),
                                                                               ((4, 2, 3), "randn", W)], (F32,)),
    ("conv1d_same", lambda x, w: F.conv1d(x, w, padding="same"), [((1, 3, 10), "randn"), ((5, 3, 4), "randn", W)], (F32,)),
    ("conv2d_same_odd", lambda x, w: F.conv2d(x, w, padding="same"), [((1, 3, 7, 8), "randn"),
                                                                     ((4, 3, 3, 4), "randn", W)], (F32,)),
    ("conv2d_same_dilated", lambda x, w: F.conv2d(x, w, padding="same", dilation=2), [((1, 3, 9, 9), "randn"),
                                                                                     ((4, 3, 3, 3), "randn", W)], (F32,)),
    ("conv2d_valid", lambda x, w: F.conv2d(x, w, padding="valid"), [((1, 3, 6, 6), "randn"),
                                                                   ((2, 3, 3, 3), "randn", W)], (F32,)),
    # group norm: Wav2Vec2, PoolFormer, BiT; weight norm: Wav2Vec2's positional conv
    ("group_norm", lambda x, w, b: F.group_norm(x, 3, w, b, 1e-5), [((2, 6, 4, 5), "randn"), ((6,), "randn", W),
                                                                     ((6,), "randn", W)], (F32, BF16)),
    ("group_norm_1d_no_affine", lambda x: F.group_norm(x, 2), [((2, 4, 7), "randn")], (F32,)),
    ("weight_norm", lambda x, v, g: F.conv1d(x, torch._weight_norm(v, g, 2)), [((1, 4, 9), "randn"),
                                                                              ((3, 4, 3), "randn", W),
                                                                              ((1, 1, 3), "positive", W)], (F32,)),
    # BiT's weight standardization: batch norm with the tensor's own statistics
    ("batch_norm_batch_stats", lambda x: F.batch_norm(x, None, None, training=True, eps=1e-6),
     [((1, 6, 12), "randn")], (F32,)),
    # ConvNeXt V2's global response norm
    ("vector_norm", lambda x: torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True), [((2, 5, 5, 3), "randn")],
     (F32,)),
    ("vector_norm_ords", lambda x: torch.linalg.vector_norm(x, 1) + torch.linalg.vector_norm(x, float("inf"), 0).sum()
     + torch.linalg.vector_norm(x, 3, -1).sum(), [((4, 5), "randn")], (F32,)),
    # ConvBERT's span convolution (F.unfold); PatchTST / PatchTSMixer patching (Tensor.unfold)
    ("im2col", lambda x: F.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1)),
     [((2, 3, 7, 6), "randn")], (F32,)),
    ("unfold", lambda x: x.unfold(1, 4, 3), [((2, 11, 3), "randn")], (F32, I64)),
    ("clamp_min", lambda x: x.clamp_min(0.1) + x.clamp_max(0.2), [((3, 4), "randn")], (F32,)),
    ("clamp_tensor", lambda x, lo: torch.clamp(x, min=lo, max=lo + 1), [((3, 4), "randn"), ((4,), "randn")], (F32,)),
    # Funnel's attention
    ("einsum_scores", lambda q, k: torch.einsum("bind,bjnd->bnij", q, k), [((2, 5, 3, 4), "randn"),
                                                                         ((2, 6, 3, 4), "randn")], (F32,)),
    ("einsum_implicit_sum", lambda a, b: torch.einsum("ij,jk", a, b) + torch.einsum("ijk->j", a[None]).sum(),
     [((3, 4), "randn"), ((4, 5), "randn")], (F32,)),
    ("einsum_three", lambda a, b, c: torch.einsum("ab,bc,cd->ad", a, b, c), [((2, 3), "randn"), ((3, 4), "randn"),
                                                                           ((4, 5), "randn")], (F32,)),
    ("slice_scatter", lambda x, s: torch.slice_scatter(x, s, 1, 2, 5), [((3, 8), "randn"), ((3, 3), "randn")],
     (F32, I64)),
    ("select_scatter", lambda x, s: torch.select_scatter(x, s, 0, -1), [((3, 4), "randn"), ((4,), "randn")],
     (F32,)),
    # BEiT's relative position bias table: interpolated, indexed with a literal index table
    ("upsample_bilinear", lambda x: F.interpolate(x, size=(7, 5), mode="bilinear", align_corners=False),
     [((1, 2, 4, 6), "randn")], (F32,)),
    ("upsample_bilinear_align", lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
     [((1, 2, 3, 4), "randn")], (F32,)),
    ("upsample_bicubic", lambda x: F.interpolate(x, size=(9, 3), mode="bicubic"), [((1, 1, 5, 4), "randn")], (F32,)),
    ("upsample_nearest", lambda x: F.interpolate(x, scale_factor=(2, 3), mode="nearest"), [((1, 2, 3, 2), "randn")],
     (F32,)),
    ("upsample_linear1d", lambda x: F.interpolate(x, size=11, mode="linear"), [((1, 2, 4), "randn")], (F32,)),
    ("index_none_take", lambda x, i: x[:, i], [((3, 5, 2), "randn"), ((4, 2), "int5")], (F32,)),
    ("index_adjacent", lambda x, i, j: x[:, i, j], [((2, 4, 5, 3), "randn"), ((6,), "int4"), ((6,), "int5")], (F32,)),
    ("index_split", lambda x, i, j: x[i, :, j], [((4, 2, 5), "randn"), ((3,), "int4"), ((3,), "int5")], (F32,)),
    ("relative_bias_table", lambda t, i: t[i.view(-1)].view(4, 4, -1).permute(2, 0, 1),
     [((7, 3), "randn", W), ((4, 4), "int7")], (F32,)),
    # the list: Swin's shifted windows, MobileNetV3, position ids, pooled audio features
    ("roll", lambda x: torch.roll(x, shifts=(-3, 2), dims=(1, 2)) + torch.roll(x, 5), [((2, 7, 6, 3), "randn")],
     (F32, I64)),
    ("hardswish_hardsigmoid", lambda x: F.hardswish(x) + F.hardsigmoid(x) + F.relu6(x * 4),
     [((3, 20), "randn")], (F32, BF16)),
    ("adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 3) + F.adaptive_avg_pool1d(x, 1),
     [((2, 4, 10), "randn")], (F32,)),
    ("avg_max_pool1d", lambda x: F.avg_pool1d(x, 3, 2, 1) + F.max_pool1d(x, 3, 2, 1), [((2, 3, 9), "randn")], (F32,)),
    # activations and elementwise composites
    ("mish_softplus_elu", lambda x: F.mish(x) + F.softplus(x, 2.0, 5.0) + F.elu(x, 0.7) + F.selu(x) + F.celu(x),
     [((4, 8), "randn")], (F32,)),
    ("logsigmoid_glu_shrink", lambda x: F.logsigmoid(x) + F.glu(torch.cat([x, x], -1)) + F.hardshrink(x) +
     F.softshrink(x) + F.threshold(x, 0.1, -2.0), [((4, 8), "randn")], (F32,)),
    ("prelu", lambda x, w: F.prelu(x, w), [((2, 3, 4), "randn"), ((3,), "randn", W)], (F32,)),
    ("unary_math", lambda x: torch.expm1(x) + torch.log1p(x) + torch.log2(x) + torch.log10(x) + torch.exp2(x) +
     torch.tan(x) + torch.erfc(x) + torch.sinh(x) + torch.cosh(x), [((3, 5), "positive")], (F32,)),
    ("trunc_frac_square", lambda x: torch.trunc(x * 3) + torch.frac(x * 3) + torch.square(x) + torch.sgn(x),
     [((3, 5), "randn")], (F32,)),
    ("isinf_isfinite_xor", lambda x: (torch.isinf(x / 0.0) ^ torch.isfinite(x)) | torch.isneginf(-x / 0.0),
     [((3, 5), "randn")], (F32,)),
    ("addcmul_lerp", lambda a, b, c: torch.addcmul(a, b, c, value=0.5) + torch.addcdiv(a, b, c.abs() + 1) +
     torch.lerp(a, b, 0.3), [((3, 4), "randn")] * 3, (F32,)),
    ("remainder_fmod_int", lambda a: torch.remainder(a - 2, 3) + torch.fmod(a - 2, 3), [((3, 4), "int9")], (I64,)),
    # no converter: PyTorch's own decomposition into its Core ATen opset, applied on import
    ("core_decompositions", lambda x: torch.logit(x, 1e-6) + torch.xlogy(x, x + 2) + torch.rot90(x, 1, (0, 1)) +
     torch.nan_to_num(x) + torch.deg2rad(x), [((4, 4), "positive")], (F32,)),
    ("rrelu_eval", lambda x: F.rrelu(x, training=False), [((3, 4), "randn")], (F32,)),
    # reductions
    ("var_std", lambda x: x.var(1) + x.std(1, keepdim=True).sum(1) + torch.var(x, unbiased=False) +
     torch.var_mean(x, 0, correction=0)[0].sum() + torch.std_mean(x, dim=1)[1], [((3, 6), "randn")], (F32,)),
    ("any_all", lambda x: x.any(1).int() + x.all(1).int() + (x > 0).all().int(), [((3, 5), "int2")], (I64,)),
    ("logsumexp", lambda x: torch.logsumexp(x, 1) + torch.logsumexp(x, (0, 1), keepdim=True).sum(),
     [((3, 6), "randn")], (F32,)),
    ("max_min_dim", lambda x: torch.max(x, 1)[0] + torch.max(x, 1)[1] + torch.min(x, 0, keepdim=True)[1].sum()
     + torch.max(x) + torch.min(x) + x.argmin(1) + x.argmin(), [((4, 6), "randn")], (F32, I64)),
    ("amax_amin_0d", lambda x: x.sum().amax(0) + x.sum().amin(-1, keepdim=True), [((3, 2), "randn")], (F32,)),
    ("prod", lambda x: x.prod(1) + x.prod(), [((3, 4), "randn")], (F32, I64)),
    ("native_dropout_eval", lambda x: torch.ops.aten.native_dropout(x, 0.5, False)[0] * 2, [((3, 4), "randn")], (F32,)),
    # movement
    ("repeat_tile_interleave", lambda x: x.repeat(2, 1, 3).sum(0) + x.tile(2).sum() + x.repeat_interleave(2, 1).sum(),
     [((2, 3), "randn")], (F32, I64)),
    ("flip_narrow", lambda x: x.flip(0, 2).narrow(1, 1, 2), [((3, 4, 5), "randn")], (F32,)),
    ("tril_triu", lambda x: x.tril(1) + x.triu(-1), [((2, 4, 5), "randn")], (F32,)),
    ("pixel_shuffle", lambda x: F.pixel_unshuffle(F.pixel_shuffle(x, 2), 2) + x, [((1, 8, 3, 2), "randn")], (F32,)),
    ("meshgrid", lambda a, b: sum(t.sum() for t in torch.meshgrid(a, b, indexing="xy")) + torch.stack(
        torch.meshgrid(a, b, indexing="ij")).sum(0), [((3,), "randn"), ((4,), "randn")], (F32,)),
    ("reflection_replication_pad", lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect") + F.pad(x, (1, 2, 2, 1),
                                                                                          mode="replicate"),
     [((1, 2, 4, 5), "randn")], (F32,)),
    ("pad1d_modes", lambda x: F.pad(x, (2, 1), mode="reflect") * F.pad(x, (2, 1), mode="replicate"),
     [((2, 3, 6), "randn")], (F32,)),
    ("diagonal", lambda x: torch.diagonal(x) + torch.diagonal(x, 1, 1, 2).sum() + torch.diagonal(x, -1, 0, 2).sum(),
     [((4, 5, 4), "randn")], (F32,)),
    ("empty_like", lambda x: torch.empty_like(x).zero_() + x, [((2, 3), "randn")], (F32,)),
    # Core ATen: inverse trigonometry, atan2, rounding (half to even; decimals as torch scales)
    ("inverse_trig", lambda u, v: torch.acos(u) + torch.asin(u) + torch.atanh(u) + torch.atan(v) + torch.acosh(v)
     + torch.asinh(-v), [((3, 5), "unit"), ((3, 5), "above1")], (F32, BF16)),
    ("atan2", lambda a, b: torch.atan2(a, b) + torch.arctan2(b, a), [((3, 4), "randn"), ((4,), "randn")], (F32, BF16)),
    ("round", lambda x: torch.round(x * 2) + torch.round(x, decimals=2) + torch.round(x * 30, decimals=-1),
     [((4, 6), "randn")], (F32,)),
    ("round_int", lambda x: torch.round(x) * 2, [((3, 4), "randn")], (I64,)),
    # Core ATen library ops: sorting (ties, stable order), scatters (duplicate indices), index_put
    # (int and bool-mask indices), masked_scatter, as_strided, 3-D pooling, distances, sampling, bags
    ("sort", lambda x: torch.stack([torch.sort(x, -1).values, torch.sort(x, -1).indices.to(x.dtype)]),
     [((3, 7), "randn")], (F32, I64)),
    ("sort_stable_descending", lambda x: torch.sort(x, dim=0, descending=True, stable=True).indices * 2,
     [((40, 3), "randn")], (I64,)),
    ("topk", lambda x: torch.topk(x, 3, 1).values * torch.topk(x, 3, 1, largest=False).indices, [((4, 9), "randn")],
     (F32, I64)),
    ("scatter", lambda x, i, s: x.scatter(1, i, s) + x.scatter(1, i, 2.5), [((3, 6), "randn"), ((3, 4), "int6"),
                                                                           ((3, 5), "randn")], (F32,)),
    ("scatter_add_reduce", lambda x, i, s: x.scatter_add(0, i, s) + x.scatter_reduce(0, i, s, "amax",
                                                                                     include_self=False),
     [((4, 5), "randn"), ((6, 5), "int4"), ((6, 5), "randn")], (F32,)),
    ("index_put_accumulate", lambda x, i, v: x.index_put((i,), v, accumulate=True), [((5, 3), "randn"),
                                                                                    ((8,), "int5"), ((8, 3), "randn")],
     (F32,)),
    ("index_put_columns", lambda x, i, v: _assign_columns(x, i, v), [((3, 6), "randn"), ((2,), "int6"),
                                                                     ((3, 2), "randn")], (F32,)),
    ("index_put_bool_mask", lambda x: _assign_negative(x), [((4, 5), "randn")], (F32,)),
    ("masked_scatter", lambda x, m, s: x.masked_scatter(m, s), [((3, 4), "randn"), ((4,), "bool"), ((20,), "randn")],
     (F32,)),
    ("as_strided", lambda x: x.as_strided((3, 3), (2, 1), 1) * 2, [((4, 5), "randn")], (F32,)),
    ("max_pool3d_indices", lambda x: F.max_pool3d(x, 2, return_indices=True)[1].float()
     + F.max_pool3d(x, 2, return_indices=True)[0], [((1, 2, 4, 6, 6), "randn")], (F32,)),
    ("avg_pool3d_adaptive", lambda x: F.avg_pool3d(x, 3, 2, 1, count_include_pad=False)
     + F.adaptive_avg_pool3d(x, (3, 3, 3)), [((1, 2, 6, 6, 6), "randn")], (F32,)),
    ("cdist", lambda a, b: torch.cdist(a, b) + torch.cdist(a, b, 1.0), [((2, 5, 4), "randn"), ((2, 6, 4), "randn")],
     (F32,)),
    ("pdist", lambda x: F.pdist(x), [((6, 4), "randn")], (F32,)),
    ("embedding_bag", lambda i, w: F.embedding_bag(i, w, torch.tensor([0, 2, 5]), mode="mean"),
     [((7,), "int10"), ((10, 4), "randn", W)], (F32,)),
    ("embedding_bag_padding", lambda i, w, p: F.embedding_bag(i, w, torch.tensor([0, 3]), mode="sum",
                                                              per_sample_weights=p, padding_idx=-1),
     [((6,), "int5"), ((5, 3), "randn", W), ((6,), "randn")], (F32,)),
    ("grid_sample", lambda x, g: F.grid_sample(x, g, align_corners=False), [((1, 2, 5, 6), "randn"),
                                                                            ((1, 3, 4, 2), "randn")], (F32,)),
    ("col2im", lambda x: F.fold(x, (5, 4), (2, 2)), [((2, 12, 12), "randn")], (F32,)),
    ("copy_fill", lambda x, v: x.clone().copy_(v) + torch.zeros_like(x).fill_(v.sum()), [((3, 4), "randn"),
                                                                                       ((4,), "randn")], (F32,)),
]


def _assign_columns(x, i, v):
    y = x.clone()
    y[:, i] = v  # index_put with indices [None, i]
    return y


def _assign_negative(x):
    y = x.clone()
    y[y < 0] = 0.5  # index_put with a bool mask and one value
    return y


class _Model(torch.nn.Module):
    """fn over inputs; the ``weight`` inputs are parameters (constants to Kiln)."""

    def __init__(self, fn, specs, tensors):
        super().__init__()
        self.fn = fn
        self.is_weight = [len(s) > 2 and s[2] == W for s in specs]
        for i, (t, w) in enumerate(zip(tensors, self.is_weight)):
            if w:
                self.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=False))

    def forward(self, *xs):
        it = iter(xs)
        args = [getattr(self, f"p{i}") if w else next(it) for i, w in enumerate(self.is_weight)]
        return self.fn(*args)


def _params():
    for name, fn, specs, dtypes in OPS:
        for dt in dtypes:
            yield pytest.param(fn, specs, dt, id=f"{name}-{str(dt)[6:]}")


@pytest.mark.parametrize("fn,specs,dtype", _params())
def test_converted_op_matches_eager_without_fallback(fn, specs, dtype):
    tensors = [_mk(s[0], dtype if s[1] in ("randn", "positive", "unit", "above1") else F32, s[1]) for s in specs]
    if dtype is I64:
        tensors = [t if not t.is_floating_point() else (t * 4).round().to(I64) for t in tensors]
    model = _Model(fn, specs, tensors).eval()
    inputs = [t for t, s in zip(tensors, specs) if not (len(s) > 2 and s[2] == W)]
    with torch.no_grad():
        want = model(*inputs)
    fast = kiln.compile(model, inputs)
    got = fast(*inputs)
    assert not fast.report.fallbacks, fast.report.fallbacks
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    if want.is_floating_point():
        tol = 2e-2 if dtype is BF16 else 1e-5
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("groups,shape,op", [(8, (1, 16, 6, 6), OpKind.GROUP_NORM), (1, (1, 16, 6, 6), OpKind.LAYER_NORM),
                                             (4, (1, 16, 9), OpKind.LAYER_NORM)])
def test_an_images_group_norm_stays_one_op(groups, shape, op):
    # several groups over an image: one GROUP_NORM (torch's kernel reads channels-last images
    # in place); one group, or a sequence: a layer norm over each group's elements
    norm = torch.nn.GroupNorm(groups, 16).eval()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(shape)
    fast = kiln.compile(norm, [x])
    kinds = {n.op for n in fast.compiled[0].graph.nodes}
    assert op in kinds and ({OpKind.GROUP_NORM, OpKind.LAYER_NORM} - {op}).isdisjoint(kinds)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), norm(x), atol=1e-5, rtol=1e-5)


def test_max_pool_indices_are_computed_or_fall_back_never_none():
    # the indices of a dilated max pool were returned as None: a silent wrong answer
    fn = lambda x: F.max_pool2d(x, 2, dilation=2, return_indices=True)  # noqa: E731
    x = torch.randn(1, 2, 7, 7)
    fast = kiln.compile(fn, [x])
    got, want = fast(x), fn(x)
    assert got[1] is not None and torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert [op for op, _, _ in fast.report.fallbacks] == ["aten.max_pool2d_with_indices.default"]
    only_values = lambda x: F.max_pool2d(x, 3, 2, 1, dilation=1) * 2  # noqa: E731  (indices unused: converted)
    fast = kiln.compile(only_values, [x])
    assert not fast.report.fallbacks and torch.equal(fast(x), only_values(x))


def test_literal_only_ops_fold_at_import():
    # an index table built from meshgrid and index assignments (BEiT) needs no converter: it is
    # evaluated once at import, like any op on literals
    def fn(x):
        c = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + 2
        idx = torch.zeros(10, 10, dtype=torch.int64)
        idx[1:, 1:] = rel[..., 0] * 5 + rel[..., 1]
        idx[0, :] = 25
        return x[idx.view(-1)].view(10, 10, -1)
    x = torch.randn(26, 2)
    fast = kiln.compile(fn, [x])
    assert not fast.report.fallbacks
    torch.testing.assert_close(fast(x), fn(x))

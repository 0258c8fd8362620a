"""Kiln's AVX2 fp32 GEMM (csrc/f32_gemm.cpp, kernels/avx2_linear.py) against torch's linear:
row counts across the 6-row register tile (1-13, and past the 256-k blocks), channel counts
that leave a partial 16-channel panel, strided rows, the fused bias, the fused ReLU/GELU
(applied as the last k block stores: checked past one block and at special values) and the
torch epilogue for the rest."""
import pytest
import torch

from kiln.ir import GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.ir.reference import REFERENCE
from kiln.kernels import avx2_linear
from kiln.kernels.registry import candidates, kernels_for

pytestmark = pytest.mark.skipif(not avx2_linear.supported(), reason="Kiln was built without AVX2 and FMA")


def _node(x_shape, w, bias, residual=False, act=A.Activation.NONE):
    b = GraphBuilder()
    ins = [b.input("x", x_shape), b.const(w), b.const(bias) if bias is not None else None]
    if residual:
        ins.append(b.input("r", (*x_shape[:-1], w.shape[0])))
    return b.build([b.add(OpKind.LINEAR, *ins, attrs=A.LinearAttrs(act))]).nodes[0]


def _kernel():
    return next(k for k in kernels_for(OpKind.LINEAR, "cpu") if k.name == "cpu.avx2_linear")


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 70])
@pytest.mark.parametrize("n,k", [(16, 8), (33, 300), (768, 600), (5, 1)])
def test_matches_torch_linear(rows, n, k):
    w, bias = torch.randn(n, k), torch.randn(n)
    node = _node((rows, k), w, bias)
    fn = _kernel().bind(node, [None, w, bias])
    x = torch.randn(rows, k)
    torch.testing.assert_close(fn([x, w, bias], node.attrs), torch.nn.functional.linear(x, w, bias),
                               atol=1e-4 * k ** 0.5, rtol=1e-4)


def test_strided_rows_residual_activation_and_no_bias():
    w = torch.randn(40, 24)
    node = _node((3, 5, 24), w, None, residual=True, act=A.Activation.RELU)
    assert avx2_linear._accepts(node) == (not avx2_linear._host_has_avx512())
    fn = _kernel().bind(node, [None, w, None, None])
    x = torch.randn(3, 5, 50)[..., 3:27]  # rows 50 apart, as a slice hands over
    r = torch.randn(3, 5, 40)
    want = REFERENCE[OpKind.LINEAR]([x, w, None, r], node.attrs)
    torch.testing.assert_close(fn([x, w, None, r], node.attrs), want, atol=1e-4, rtol=1e-4)


def test_one_packed_weight_serves_every_row_count():
    # a dynamic plan's node: symbolic rows, the weight packed once at prepare
    from kiln.ir.types import Sym

    w, bias = torch.randn(48, 32), torch.randn(48)
    b = GraphBuilder()
    x = b.input("x", (Sym("batch"), Sym("seq"), 32))
    node = b.build([b.add(OpKind.LINEAR, x, b.const(w), b.const(bias))]).nodes[0]
    # a candidate where the CPU has no AVX-512 (there MKL's and oneDNN's GEMMs are wider)
    offered = "cpu.avx2_linear" in [k.name for k in candidates(node, "cpu")]
    assert offered == (not avx2_linear._host_has_avx512())
    fn = _kernel().bind(node, [None, w, bias])
    for shape in ((1, 1, 32), (1, 37, 32), (3, 129, 32), (0, 4, 32)):
        x = torch.randn(shape)
        torch.testing.assert_close(fn([x, w, bias], node.attrs), torch.nn.functional.linear(x, w, bias),
                                   atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise_value_errors():
    from kiln import _C

    p = _C.f32_prepack(torch.randn(8, 4).numpy())
    with pytest.raises(ValueError, match="x: expected shape"):
        _C.f32_linear(torch.randn(2, 5).numpy(), p, None, torch.empty(2, 8).numpy(), 1)
    with pytest.raises(ValueError, match="expected float32"):
        _C.f32_linear(torch.randn(2, 4).double().numpy(), p, None, torch.empty(2, 8).numpy(), 1)
    with pytest.raises(ValueError, match="bias"):
        _C.f32_linear(torch.randn(2, 4).numpy(), p, torch.randn(3).numpy(), torch.empty(2, 8).numpy(), 1)
    with pytest.raises(ValueError, match="fuses the activations none, relu and gelu"):
        _C.f32_linear(torch.randn(2, 4).numpy(), p, None, torch.empty(2, 8).numpy(), 1, "silu")
    with pytest.raises(ValueError, match="activation must be one of"):
        _C.f32_linear(torch.randn(2, 4).numpy(), p, None, torch.empty(2, 8).numpy(), 1, "swish")


@pytest.mark.parametrize("act", [A.Activation.RELU, A.Activation.GELU, A.Activation.GELU_TANH])
@pytest.mark.parametrize("rows,n,k", [(7, 33, 600), (70, 16, 8), (1, 5, 1)])
def test_activations_match_torch(act, rows, n, k):
    # ReLU and GELU are applied in the GEMM (after the last of several k blocks at k = 600);
    # the tanh GELU through the torch epilogue
    w, bias = torch.randn(n, k) / k ** 0.5, torch.randn(n)
    node = _node((rows, k), w, bias, act=act)
    fn = _kernel().bind(node, [None, w, bias])
    x = torch.randn(rows, k) * 3
    want = REFERENCE[OpKind.LINEAR]([x, w, bias], node.attrs)
    torch.testing.assert_close(fn([x, w, bias], node.attrs), want, atol=2e-5 * k ** 0.5, rtol=1e-4)


def _gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """GELU by its definition, x * (1 + erf(x / sqrt 2)) / 2, in float64: gelu(+inf) = +inf.
    (torch's own fp32 kernel agrees except there: on a CPU where it dispatches to AVX-512 it
    returns NaN for +inf.)"""
    d = x.double()
    return (d * 0.5 * (1 + torch.erf(d / 2 ** 0.5))).float()


def test_fused_activations_at_special_values():
    # k = 1 and a weight of ones: every channel of row r is act(v[r]) (NaN, infinities, the
    # erf clamp at |x / sqrt 2| = 4 and past it, zeros, tiny values), a full 16-channel panel
    # and a partial one
    from kiln import _C

    v = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, -1e-30, 5.65, -5.65, 5.66,
                      -5.66, 8.0, -8.0, 30.0, -30.0, 1e30, -1e30, 0.5, -0.5, 2.0, -2.0, 3.3, -3.3, 87.0])
    x = v.reshape(-1, 1)
    p = _C.f32_prepack(torch.ones(19, 1).numpy())
    for act, ref in (("relu", torch.relu), ("gelu", _gelu_exact)):
        out = torch.empty(v.numel(), 19)
        _C.f32_linear(x.numpy(), p, None, out.numpy(), 1, act)
        torch.testing.assert_close(out, ref(x).expand(-1, 19), atol=2e-7, rtol=2e-6, equal_nan=True,
                                   msg=lambda m: f"{act}: {m}")
    out = torch.empty(2, 3)  # K = 0: act(bias) in every row
    _C.f32_linear(torch.empty(2, 0).numpy(), _C.f32_prepack(torch.empty(3, 0).numpy()),
                  torch.tensor([-1.0, 0.5, 2.0]).numpy(), out.numpy(), 1, "gelu")
    torch.testing.assert_close(out, torch.nn.functional.gelu(torch.tensor([-1.0, 0.5, 2.0])).repeat(2, 1))


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_the_panels(threads):
    from kiln import _C

    w, bias, x = torch.randn(100, 70), torch.randn(100), torch.randn(9, 70)
    out = torch.empty(9, 100)
    _C.f32_linear(x.numpy(), _C.f32_prepack(w.numpy()), bias.numpy(), out.numpy(), threads)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias), atol=1e-4, rtol=1e-4)


def test_row_chunks_and_k_blocks():
    # more rows than one 120-row chunk (and a partial tile after it), more k than one 256-k block
    from kiln import _C

    w, bias, x = torch.randn(40, 600), torch.randn(40), torch.randn(251, 600)
    out = torch.empty(251, 40)
    _C.f32_linear(x.numpy(), _C.f32_prepack(w.numpy()), bias.numpy(), out.numpy(), 1)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias), atol=1e-3, rtol=1e-4)

"""The packed bf16 linears (csrc/bf16_gemm.cpp) — ``cpu.amx_linear`` on AMX tiles and
``cpu.bf16_dot_linear`` on AVX512-BF16 dot products, each tested where the CPU has it —
against fp32 math on the same bf16 operands: the kernels sum in fp32 and round once, so they
must be within one bf16 step of the exact result; and as Kiln kernels against the reference
LINEAR."""
import pytest
import torch

from kiln import _C
from kiln.ir import DType, GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.kernels import amx_linear
from kiln.ir.reference import linear as ref_linear
from kiln.kernels.registry import kernels_for


@pytest.fixture(params=[
    pytest.param(("cpu.amx_linear", "bf16_linear"), id="amx",
                 marks=pytest.mark.skipif(not amx_linear.supported(), reason="needs a CPU with AMX-BF16")),
    pytest.param(("cpu.bf16_dot_linear", "bf16_dot_linear"), id="dot",
                 marks=pytest.mark.skipif(not amx_linear.dot_supported(), reason="needs a CPU with AVX512-BF16")),
])
def kind(request):
    """(the Kiln kernel's name, its kiln._C function)"""
    name, fn = request.param
    return name, getattr(_C, fn)

ACTS = {"none": lambda y: y, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda y: torch.nn.functional.gelu(y, approximate="tanh"), "silu": torch.nn.functional.silu,
        "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _bits(t):
    return t.view(torch.int16).numpy()


def _exact(x, w, bias, residual, act):
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    return ACTS[act](y)


def _check_bf16(out, exact):
    # one rounding to bf16 (relative 2^-8) plus fp32 summation error
    tol = exact.abs() * 2.0 ** -8 + 1e-3 * exact.abs().max() + 1e-6
    assert bool(((out.double() - exact).abs() <= tol).all()), float((out.double() - exact).abs().max())


@pytest.mark.parametrize("m,k,n", [(128, 768, 96), (1, 64, 16), (37, 70, 33), (48, 96, 48), (16, 32, 17),
                                   (200, 160, 40), (7, 1, 5), (13, 33, 65)])
@pytest.mark.parametrize("act", list(ACTS))
def test_bf16_linear_matches_fp32_math(kind, m, k, n, act):
    linear = kind[1]
    torch.manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k).bfloat16(), (torch.randn(n, k) / k ** 0.5).bfloat16()
    bias, res = torch.randn(n), torch.randn(m, n).bfloat16()
    packed = _C.bf16_prepack(_bits(w))
    out = torch.empty(m, n, dtype=torch.bfloat16)
    linear(_bits(x), packed, bias.numpy(), _bits(res), act, _bits(out), 2)
    _check_bf16(out, _exact(x, w, bias, res, act))
    out32 = torch.empty(m, n)  # fp32 output, no bias or residual
    linear(_bits(x), packed, None, None, act, out32.numpy(), 1)
    torch.testing.assert_close(out32.double(), _exact(x, w, None, None, act), atol=1e-4, rtol=1e-4)


def test_strided_rows_and_fp32_residual(kind):
    linear = kind[1]
    # x: every other row of a wider buffer (a slice view); the output: columns of a wider one
    buf = torch.randn(64, 200).bfloat16()
    x = buf[::2, 8:136]
    w = (torch.randn(48, 128) / 12).bfloat16()
    res = torch.randn(32, 48)
    packed = _C.bf16_prepack(_bits(w))
    wide = torch.zeros(32, 64, dtype=torch.bfloat16)
    out = wide[:, 4:52]
    linear(_bits(x), packed, None, res.numpy(), "none", _bits(out), 2)
    _check_bf16(out, _exact(x, w, None, res, "none"))
    assert bool((wide[:, :4] == 0).all()) and bool((wide[:, 52:] == 0).all())  # nothing outside written


def test_bad_arguments_are_rejected(kind):
    linear = kind[1]
    w = torch.randn(16, 32).bfloat16()
    packed = _C.bf16_prepack(_bits(w))
    out = torch.empty(4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x: expected shape"):
        linear(_bits(torch.randn(4, 31).bfloat16()), packed, None, None, "none", _bits(out), 1)
    with pytest.raises(ValueError, match="bfloat16"):
        linear(torch.randn(4, 32).numpy(), packed, None, None, "none", _bits(out), 1)
    with pytest.raises(ValueError, match="activation"):
        linear(_bits(torch.randn(4, 32).bfloat16()), packed, None, None, "swish", _bits(out), 1)
    with pytest.raises(ValueError, match="out: expected shape"):
        linear(_bits(torch.randn(4, 32).bfloat16()), packed, None, None, "none",
                       _bits(torch.empty(4, 15, dtype=torch.bfloat16)), 1)
    with pytest.raises(ValueError, match="threads"):
        linear(_bits(torch.randn(4, 32).bfloat16()), packed, None, None, "none", _bits(out), 0)


@pytest.mark.parametrize("act", [A.Activation.NONE, A.Activation.GELU, A.Activation.TANH])
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_matches_reference_linear(kind, act, residual):
    b = GraphBuilder()
    x = b.input("x", (2, 5, 64), DType.BFLOAT16)
    w, bias = torch.randn(40, 64).bfloat16(), torch.randn(40).bfloat16()
    r = b.input("r", (2, 5, 40), DType.BFLOAT16) if residual else None
    y = b.add(OpKind.LINEAR, *([x, b.const(w), b.const(bias)] + ([r] if residual else [])), attrs=A.LinearAttrs(act))
    node = b.build([y]).nodes[0]
    kernel = next(k for k in kernels_for(OpKind.LINEAR, "cpu") if k.name == kind[0])
    assert kernel.accepts(node)
    args = [torch.randn(2, 5, 64).bfloat16(), w, bias] + ([torch.randn(2, 5, 40).bfloat16()] if residual else [])
    fn = kernel.bind(node, [None, w, bias] + ([None] if residual else []))
    out = fn(args, node.attrs)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 40)
    # the reference rounds to bf16 after the GEMM and again after the residual and activation
    torch.testing.assert_close(out.float(), ref_linear(args, node.attrs).float(), atol=3e-2, rtol=3e-2)


def test_kernel_declines_what_it_cannot_run(kind):
    b = GraphBuilder()
    x = b.input("x", (4, 64), DType.FLOAT32)
    node = b.build([b.add(OpKind.LINEAR, x, b.const(torch.randn(8, 64)), attrs=A.LinearAttrs())]).nodes[0]
    kernel = next(k for k in kernels_for(OpKind.LINEAR, "cpu") if k.name == kind[0])
    assert not kernel.accepts(node)  # fp32 is MKL's and oneDNN's


def test_compiled_model_and_exclude_kernels(kind):
    import kiln
    from kiln.errors import KilnError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()
    x = torch.randn(48, 64)
    plain = kiln.compile(model, (x,), precision="bf16")
    without = kiln.compile(model, (x,), precision="bf16", exclude_kernels=[kind[0]])
    with torch.no_grad():
        ref = model(x)
        for m in (plain, without):
            torch.testing.assert_close(m(x).float(), ref, atol=5e-2, rtol=5e-2)
    assert not any(kind[0] in k for k in without.report.kernels)
    with pytest.raises(KilnError, match="exclude_kernels"):
        kiln.compile(model, (x,), exclude_kernels=kind[0])


def test_kernel_with_symbolic_rows_serves_every_length(kind):
    """A dynamic plan's linear ([batch, seq, K] with symbolic batch and seq): one prepared
    kernel (the weight packed once) serves any number of rows, odd ones and zero included."""
    from kiln.ir.types import Sym
    from kiln.kernels.registry import candidates

    b = GraphBuilder()
    x = b.input("x", (Sym("batch"), Sym("seq"), 64), DType.BFLOAT16)
    r = b.input("r", (Sym("batch"), Sym("seq"), 48), DType.BFLOAT16)
    w, bias = (torch.randn(48, 64) / 8).bfloat16(), torch.randn(48).bfloat16()
    node = b.build([b.add(OpKind.LINEAR, x, b.const(w), b.const(bias), r,
                          attrs=A.LinearAttrs(A.Activation.GELU))]).nodes[0]
    assert kind[0] in [k.name for k in candidates(node, "cpu")]
    k = next(k for k in kernels_for(OpKind.LINEAR, "cpu") if k.name == kind[0])
    fn = k.bind(node.at_sizes({"batch": 1, "seq": 32}), [None, w, bias, None])
    for shape in [(1, 1), (1, 7), (2, 33), (3, 129), (1, 0)]:
        xs, rs = torch.randn(*shape, 64).bfloat16(), torch.randn(*shape, 48).bfloat16()
        out = fn([xs, w, bias, rs], node.attrs)
        assert out.shape == (*shape, 48) and out.dtype == torch.bfloat16
        if out.numel():
            _check_bf16(out.reshape(-1, 48), _exact(xs.reshape(-1, 64), w, bias.float(), rs.reshape(-1, 48), "gelu"))

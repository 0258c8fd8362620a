"""Per-tensor uint8 QUANTIZE / DEQUANTIZE in C++ (kernels/qact_cpu.py) against the reference:
bit for bit, on odd sizes (vector tails), channels-last and strided inputs, 1 and 2 threads."""
import pytest
import torch

from kiln import _C
from kiln.ir import GraphBuilder, OpKind, qformat
from kiln.ir import attrs as A
from kiln.kernels.qact_cpu import dequantize_u8, quantize_u8
from kiln.kernels.registry import candidates


def _inputs():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(37, generator=g) * 4  # a tail shorter than one vector
    yield torch.randn(3, 5, 7, generator=g) * 4
    yield (torch.randn(2, 19, 9, 11, generator=g) * 4).contiguous(memory_format=torch.channels_last)
    yield torch.randn(9, 40, generator=g)[:, ::2] * 4  # strided: copied first
    yield torch.randn(1, 3, 224, 224, generator=g) * 4  # split across threads
    # exact halves: ties round to even, as torch.round does
    yield torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0] * 3) * 0.25


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scale,zp", [(0.25, 0), (0.0371, 117), (1e-3, 255)])
def test_quantize_and_dequantize_match_the_reference(threads, scale, zp):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = A.QuantizeAttrs(scale, zp)
        for x in _inputs():
            q = quantize_u8([x], a)
            assert torch.equal(q, qformat.quantize_tensor(x, scale, zp)), tuple(x.shape)
            assert q.shape == x.shape
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
                assert q.is_contiguous(memory_format=torch.channels_last)  # the layout is kept
            assert torch.equal(dequantize_u8([q], a), qformat.dequantize_tensor(q, scale, zp))
    finally:
        torch.set_num_threads(old)


def test_bad_arguments_are_rejected():
    x = torch.randn(8)
    with pytest.raises(ValueError):
        _C.quantize_u8(x.numpy(), torch.empty(7, dtype=torch.uint8).numpy(), 0.1, 0)
    with pytest.raises(ValueError):
        _C.quantize_u8(x.numpy(), torch.empty(8, dtype=torch.uint8).numpy(), 0.0, 0)
    with pytest.raises(TypeError):
        _C.quantize_u8(x.double().numpy(), torch.empty(8, dtype=torch.uint8).numpy(), 0.1, 0)


def test_they_are_candidates():
    b = GraphBuilder()
    x = b.input("x", (4, 8))
    q = b.add(OpKind.QUANTIZE, x, attrs=A.QuantizeAttrs(0.1, 3))
    d = b.add(OpKind.DEQUANTIZE, q, attrs=A.QuantizeAttrs(0.1, 3))
    g = b.build((d,))
    names = [[k.name for k in candidates(n, "cpu")] for n in g.nodes]
    assert "cpu.quantize_u8" in names[0] and "cpu.dequantize_u8" in names[1]

"""The C++ layout change (kiln._C.transpose_batched via kernels/layout_cpu.py): NCHW <->
NHWC storage, bit for bit what torch's ``contiguous`` makes, for every element size."""
import pytest
import torch

from kiln import _C
from kiln.ir import GraphBuilder, Layout, LayoutKind, OpKind
from kiln.ir import attrs as A
from kiln.kernels.layout_cpu import transpose_layout
from kiln.kernels.registry import candidates

SHAPES = [(1, 512, 1, 77), (2, 3, 5, 7), (1, 64, 32, 32), (1, 33, 1, 65), (1, 1, 4, 4), (3, 8, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_directions_match_torch(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 10).to(dtype)
    cl = transpose_layout(x, True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    assert cl.stride() == x.contiguous(memory_format=torch.channels_last).stride()
    back = transpose_layout(cl, False)
    assert back.is_contiguous() and torch.equal(back, x)


def test_two_threads_and_inputs_in_neither_layout():
    x = torch.randn(2, 96, 40, 33)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(transpose_layout(x, True), x)
    finally:
        torch.set_num_threads(old)
    odd = torch.randn(2, 6, 5, 4).transpose(2, 3)  # neither NCHW nor NHWC storage
    y = transpose_layout(odd, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, odd)
    z = transpose_layout(odd, False)
    assert z.is_contiguous() and torch.equal(z, odd)


def test_bad_arguments_are_rejected():
    x = torch.randn(2, 3, 4).numpy()
    with pytest.raises(ValueError):
        _C.transpose_batched(x, torch.empty(2, 3, 4).numpy())  # not (batch, cols, rows)
    with pytest.raises(TypeError):
        _C.transpose_batched(x, torch.empty(2, 4, 3, dtype=torch.float64).numpy())
    with pytest.raises(ValueError):
        _C.transpose_batched(torch.randn(2, 4, 3).transpose(1, 2).numpy(), torch.empty(2, 4, 3).numpy())


def test_is_a_candidate_for_4d_layout_changes():
    for layout in (LayoutKind.CHANNELS_LAST, LayoutKind.ROW_MAJOR):
        b = GraphBuilder()
        x = b.input("x", (1, 16, 1, 50))
        y = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST)))
        if layout is LayoutKind.ROW_MAJOR:
            y = b.add(OpKind.TO_LAYOUT, y, attrs=A.LayoutAttrs(Layout(layout)))
        g = b.build((y,))
        node = g.nodes[-1]
        k = next(k for k in candidates(node, "cpu") if k.name == "cpu.transpose_layout")
        t = torch.randn(1, 16, 1, 50)
        if layout is LayoutKind.ROW_MAJOR:
            t = t.contiguous(memory_format=torch.channels_last)
        out = k.bind(node, [None])([t], node.attrs)
        assert torch.equal(out, t)
        assert out.is_contiguous(memory_format=torch.channels_last) if layout is LayoutKind.CHANNELS_LAST \
            else out.is_contiguous()

"""Complex values flow through a compiled graph (the FFTs run in PyTorch); what Kiln cannot
compile — data-dependent shapes, Python numbers read from tensors, sparse inputs, dtypes it
has no element type for — is refused with a KilnError, never another exception."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln import KilnError
from kiln.ir import DType


class _SpectralMixer(torch.nn.Module):
    """FNet / FEDformer-style token mixing: FFT, keep the real part or magnitudes, project."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        mixed = torch.fft.fft2(x).real + torch.fft.rfft(x, dim=1).abs().mean(1, keepdim=True)
        return self.proj(torch.relu(mixed))


def test_fft_model_compiles_with_complex_values_in_torch():
    m, x = _SpectralMixer().eval(), torch.randn(2, 6, 8)
    fast = kiln.compile(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
    ops = {op for op, _, _ in fast.report.fallbacks}
    assert any("fft" in op for op in ops)
    assert fast.report.kernels  # the linear and the rest run as Kiln kernels


def test_complex_inputs_and_outputs():
    fn = lambda z, w: ((z * w + z).conj(), torch.view_as_real(z))  # noqa: E731
    z = torch.randn(3, 4, dtype=torch.complex64)
    w = torch.randn(3, 4, dtype=torch.complex64)
    got, want = kiln.compile(fn, [z, w])(z, w), fn(z, w)
    torch.testing.assert_close(got[0], want[0].resolve_conj())
    torch.testing.assert_close(got[1], want[1])
    assert DType.from_torch(torch.complex64) is DType.COMPLEX64 and DType.COMPLEX64.is_complex


@pytest.mark.parametrize("fn,match", [
    (lambda x: torch.nonzero(x > 0), "shape depends on the data"),
    (lambda x: x[x > 0] * 2, "shape depends on the data"),
    (lambda x: torch.unique(x), "shape depends on the data"),
], ids=["nonzero", "boolean_mask", "unique"])
def test_data_dependent_shapes_are_a_kiln_error(fn, match):
    with pytest.raises(KilnError, match=match):
        kiln.compile(fn, [torch.randn(5)])


def test_python_numbers_from_tensors_and_sparse_inputs_are_kiln_errors():
    with pytest.raises(KilnError):
        kiln.compile(lambda x: x.sum().item(), [torch.randn(3)])
    with pytest.raises(KilnError, match="dense"):
        kiln.compile(lambda x: x * 2, [torch.eye(3).to_sparse_csr()])
    with pytest.raises(KilnError, match="no element type"):
        DType.from_torch(torch.uint64)

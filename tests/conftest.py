import os
import warnings

import pytest
import torch

os.environ.setdefault("KILN_VERIFY", "1")  # ir.verify after every stage, in all tests
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="contextlib")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def max_err_ok(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> tuple[bool, float, float]:
    """The foundation's tolerance: max abs error <= rel * max(1, |ref|max)."""
    err = (out.double() - ref.double()).abs().max().item()
    tol = rel * max(1.0, ref.abs().max().item())
    return err <= tol, err, tol

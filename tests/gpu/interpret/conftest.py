"""These tests run under Triton's CPU interpreter (TRITON_INTERPRET=1, CPU tensors) and,
on a machine with a GPU, directly on the device: tensors are created on the default device."""
import os

import pytest
import torch

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


@pytest.fixture(autouse=True)
def _default_device():
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")

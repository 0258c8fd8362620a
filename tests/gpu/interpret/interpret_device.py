"""Where the interpreter tests run: Triton's CPU interpreter (TRITON_INTERPRET=1, CPU
tensors), or, on a machine with a GPU, the device itself. Without either the modules skip
(Triton reads TRITON_INTERPRET when a kernel is defined, so tests/gpu/test_interpreter.py
runs this folder in a process started with it)."""
import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETING or not torch.cuda.is_available() else "cuda"


def skip_unless_runnable() -> None:
    if not INTERPRETING and not torch.cuda.is_available():
        pytest.skip("runs under TRITON_INTERPRET=1 (tests/gpu/test_interpreter.py) or on a GPU",
                    allow_module_level=True)


@pytest.fixture(autouse=True)
def default_device():
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")

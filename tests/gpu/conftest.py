"""GPU tests. Kernels run on CPU under Triton's interpreter in tests/gpu/interpret, which
only a process started with TRITON_INTERPRET=1 can collect (Triton reads the variable
when a kernel is defined); test_interpreter.py runs that folder in such a process. With a GPU present the folder
also runs in-process, on the device.
Tests marked ``gpu`` need a CUDA device and are skipped without one."""
import os

import pytest
import torch

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else ["interpret"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)

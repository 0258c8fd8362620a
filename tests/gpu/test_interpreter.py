"""Runs tests/gpu/interpret (every Triton library kernel and generated kernel, and the
example-model families compiled for cuda) on CPU under Triton's interpreter, in a fresh
process: Triton reads TRITON_INTERPRET when a kernel is defined, so this process, whose
kernels are compiled for real GPUs, cannot interpret them itself."""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_match_torch_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "no:cacheprovider",
                        "-W", "ignore", os.path.join(HERE, "interpret")], cwd=os.path.dirname(os.path.dirname(HERE)),
                       env=env, capture_output=True, text=True, timeout=900)
    tail = p.stdout[-6000:]
    assert p.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", tail).group(1))
    assert passed >= 77 and "failed" not in tail and "skipped" not in tail, tail


# kept out of `make test`'s time budget on 2 cores: Triton's interpreter on every kernel template: `make test-slow`, which CI runs
pytestmark = pytest.mark.slow

"""Kiln's C++ kernels, built with AddressSanitizer and run on awkward sizes."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CXX = shutil.which("g++")


@pytest.mark.slow  # a full ASan build of the kernels: make test-slow (CI runs it)
@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
def test_kernels_under_address_sanitizer(tmp_path):
    # module.cpp is the Python binding; cpu_pool.cpp is built against torch (tests/kernels/test_cpu_pool.py)
    sources = [s for s in glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
               if not s.endswith(("module.cpp", "cpu_pool.cpp"))]
    exe = tmp_path / "asan_driver"
    build = subprocess.run([CXX, "-std=c++17", "-O1", "-g", "-march=native", "-fsanitize=address,undefined",
                            "-fno-omit-frame-pointer", "-fopenmp", "-I", os.path.join(ROOT, "csrc"),
                            os.path.join(os.path.dirname(__file__), "asan_driver.cpp"), *sources, "-o", str(exe),
                            "-pthread"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
                              "UBSAN_OPTIONS": "halt_on_error=1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "asan ok" in run.stdout

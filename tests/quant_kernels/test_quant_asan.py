"""The quantized GEMMs built with AddressSanitizer + UBSan and run on awkward shapes.

Slow (a sanitized build of the templated kernels), so it runs with `make test-slow`;
tests/csrc/test_asan.py links these sources in the default run."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CXX = shutil.which("g++")
SOURCES = ["int8_gemm.cpp", "int4_gemm.cpp", "thread_pool.cpp"]


@pytest.mark.slow
@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
def test_quant_kernels_under_address_sanitizer(tmp_path):
    exe = tmp_path / "asan_quant_driver"
    build = subprocess.run([CXX, "-std=c++17", "-O1", "-g", "-march=native", "-fsanitize=address,undefined",
                            "-fno-omit-frame-pointer", "-fopenmp", "-I", os.path.join(ROOT, "csrc"),
                            os.path.join(os.path.dirname(__file__), "asan_quant_driver.cpp"),
                            *[os.path.join(ROOT, "csrc", s) for s in SOURCES], "-o", str(exe), "-pthread"],
                           check=False, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
                              "UBSAN_OPTIONS": "halt_on_error=1"})
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "asan ok" in run.stdout

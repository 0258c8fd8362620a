"""The machine's measured roofline: peak fp32 GEMM throughput and memory bandwidth.

Measured once per thread count and cached (``<cache root>/bench``, see ``kiln.runtime.cache``),
because the kernel benchmarks report every result as a fraction of these two numbers.
"""
from __future__ import annotations

import json
import os
import time

import torch


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(threads: int) -> dict:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = 1024
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        gemm_s = _best(lambda: torch.mm(a, b, out=c), 10)
        src = torch.empty(64 * 1024 * 1024 // 4)  # 64 MB: far beyond the caches
        dst = torch.empty_like(src)
        copy_s = _best(lambda: dst.copy_(src), 10)
    finally:
        torch.set_num_threads(old)
    return {"threads": threads, "peak_gflops": 2 * n ** 3 / gemm_s / 1e9,
            "bandwidth_gbs": 2 * src.numel() * 4 / copy_s / 1e9, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def roofline(threads: int | None = None, refresh: bool = False) -> dict:
    threads = threads or torch.get_num_threads()
    from kiln.runtime.cache import cache_dir

    path = os.path.join(cache_dir("bench"), f"machine-{threads}t.json")
    if not refresh and os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("threads") == threads and data.get("peak_gflops", 0) > 0:
                return data
        except (OSError, ValueError):
            pass  # a corrupt cache entry is re-measured
    data = measure(threads)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one
    return data

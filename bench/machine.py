"""The machine's measured roofline: peak fp32 GEMM throughput and memory bandwidth.

Measured once per thread count and cached (``<KILN_CACHE_DIR>/bench``),
because the kernel benchmarks report every result as a fraction of these two numbers.

    python -m kiln.bench.machine [--rounds 5] [--threads 1,2]

prints the ceilings themselves, measured afresh in interleaved rounds (these machines are
shared, and a round that ran in a busy moment shows it): the register-only throughput of the
fp32 FMA units, of AVX-512's dot products, bf16 (VDPBF16PS) and int8 (VPDPBUSD: what bf16 and
int8 GEMMs run at on a CPU without AMX), and of the AMX tiles, bf16 (TDPBF16PS) and int8
(TDPBSSD) (``kiln._C.compute_peak_gflops``), an fp32 GEMM (``torch.mm``, 1024^3) and a 64 MB
copy, per thread count, and what the extra threads add.

The AMX figures are the best over 1..6 independent accumulator tiles (six plus the two
source tiles fill the eight): each tile instruction's result feeds the next one on the same
accumulator, so a loop with too few chains in flight measures the instruction's latency,
not the unit. ``--sweep`` prints the rate per accumulator count. Beside them stands the
theoretical figure: one TDPBF16PS (16x16x32 multiply-adds, 1,024 FLOP per cycle when one
issues every 16 cycles) or TDPBSSD (16x16x64, 2,048 ops per cycle) per core, at the core
clock measured by a chain of dependent one-cycle adds (the clock under AMX load may be lower).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _best(fn, repeats: int) -> float:
    from kiln.kernels.timing import best_seconds

    return best_seconds([fn], repeats, warmup=1)[0]


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
    from kiln.options import cache_subdir

    path = os.path.join(cache_subdir("bench"), f"machine-{threads}t.json")
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


# one tile instruction per 16 cycles per core: bf16 16x16x32 and int8 16x16x64 multiply-adds
AMX_OPS_PER_CYCLE = {"bf16": 2 * 16 * 16 * 32 / 16, "int8": 2 * 16 * 16 * 64 / 16}
AMX_ACCUMULATORS = (1, 2, 4, 6)


def amx_rate(kind: str, threads: int, accumulators: int = 6, iters: int = 100_000) -> float | None:
    """Register-only AMX throughput (bf16 GFLOP/s or int8 GOP/s) summed over ``threads``
    threads (``kind`` "bf16_loaded" / "int8_loaded": a 2 x 2 GEMM block loading its source
    tiles from L1); None where the CPU (or the build) has no AMX."""
    return register_rate(f"amx_{kind}", threads, iters, accumulators)


def amx_ceilings(threads: int, rounds: int = 3) -> dict:
    """The AMX ceilings now: the best of ``rounds`` runs with six accumulators, per kind
    (``{"bf16": GFLOP/s, "int8": GOP/s}``, None where absent)."""
    out = {}
    for kind in ("bf16", "int8"):
        vals = [v for v in (amx_rate(kind, threads) for _ in range(rounds)) if v is not None]
        out[kind] = max(vals) if vals else None
    return out


def clock_ghz(iters: int = 20_000_000) -> float:
    from kiln import _C

    return _C.compute_peak_gflops("clock", 1, iters)


def register_rate(unit: str, threads: int, iters: int = 1_000_000, accumulators: int = 6) -> float | None:
    """Register-only throughput of ``unit`` (``kiln._C.compute_peak_gflops``: "fma",
    "dot_bf16", "dot_int8", "amx_bf16", ...) summed over ``threads`` threads; None where the
    CPU (or the build) lacks the instructions."""
    from kiln import _C

    try:
        return _C.compute_peak_gflops(unit, threads, iters, accumulators)
    except RuntimeError:
        return None


def ceilings(threads: int) -> dict:
    """One round of every ceiling at ``threads`` threads (FMA / dot products / AMX: None where
    not built or not present)."""
    m = measure(threads)
    return {"fma": register_rate("fma", threads), "dot_bf16": register_rate("dot_bf16", threads),
            "dot_int8": register_rate("dot_int8", threads), "amx_bf16": amx_rate("bf16", threads),
            "amx_int8": amx_rate("int8", threads), "gemm": m["peak_gflops"], "copy": m["bandwidth_gbs"],
            "clock": clock_ghz()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="The machine's compute and memory ceilings, per thread count.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--sweep", action="store_true", help="AMX rate per number of accumulator tiles in flight")
    args = ap.parse_args(argv)
    counts = [int(t) for t in args.threads.split(",")]
    rounds: dict[int, list[dict]] = {t: [] for t in counts}
    for _ in range(args.rounds):
        for t in counts:
            rounds[t].append(ceilings(t))
    cols = [("fma", "FMA fp32 GFLOP/s"), ("dot_bf16", "dot bf16 GFLOP/s"), ("dot_int8", "dot int8 GOP/s"),
            ("amx_bf16", "AMX bf16 GFLOP/s"), ("amx_int8", "AMX int8 GOP/s"),
            ("gemm", "fp32 GEMM GFLOP/s"), ("copy", "copy GB/s"), ("clock", "clock GHz")]
    print(f"median of {args.rounds} interleaved rounds (min-max)")
    print("| threads | " + " | ".join(c for _, c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    med = {}
    for t in counts:
        cells = []
        for k, _ in cols:
            vals = [r[k] for r in rounds[t] if r[k] is not None]
            med[t, k] = statistics.median(vals) if vals else None
            fmt = ".2f" if k == "clock" else ".0f"
            cells.append(f"{med[t, k]:{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})" if vals else "n/a")
        print(f"| {t} | " + " | ".join(cells) + " |")
    # the best round's clock: a thread that loses its core to other work measures a slower one
    ghz = max((r["clock"] for r in rounds[counts[0]] if r["clock"]), default=None)
    if ghz and any(med[t, f"amx_{k}"] for t in counts for k in ("bf16", "int8")):
        print(f"\nAMX theoretical at {ghz:.2f} GHz (one tile instruction per 16 cycles per core): "
              + ", ".join(f"{k} {AMX_OPS_PER_CYCLE[k] * ghz:.0f} G{'FLOP' if k == 'bf16' else 'OP'}/s per core"
                          for k in ("bf16", "int8")))
        for t in counts:
            for k in ("bf16", "int8"):
                if med[t, f"amx_{k}"]:
                    print(f"  {t} thread(s) {k}: measured {med[t, f'amx_{k}'] / (t * AMX_OPS_PER_CYCLE[k] * ghz):.0%}"
                          f" of the theoretical figure for {t} core(s)")
    if args.sweep:
        print("\nAMX rate by independent accumulator tiles in flight (1 thread, best of 3), and a GEMM's")
        print("2 x 2 block loading its four source tiles from L1 every step (what feeding the tiles costs):")
        print("| accumulators | " + " | ".join(str(a) for a in AMX_ACCUMULATORS) + " | 2x2 block, tiles loaded |")
        print("|---|" + "---|" * (len(AMX_ACCUMULATORS) + 1))
        for k in ("bf16", "int8"):
            vals = [max((amx_rate(k, 1, a) or 0) for _ in range(3)) for a in AMX_ACCUMULATORS]
            vals.append(max((amx_rate(f"{k}_loaded", 1) or 0) for _ in range(3)))
            print(f"| {k} | " + " | ".join(f"{v:.0f}" for v in vals) + " |")
    base = counts[0]
    for t in counts[1:]:
        gains = ", ".join(f"{k} {med[t, k] / med[base, k]:.2f}x" for k, _ in cols
                          if med[t, k] and med[base, k])
        print(f"{t} threads over {base}: {gains}")


if __name__ == "__main__":
    main()

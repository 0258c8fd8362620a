"""Group norm over channels-last images: Kiln's kernel against torch's, time and error.

On BiT's norm shapes (32 groups over its stages' channels and image sizes, batch 1, fp32,
channels-last as Kiln's plans keep them between convolutions), interleaved rounds, median:

* ``kiln`` — ``cpu.group_norm_nhwc`` (kernels/norm_cpu.py: two passes over the image in
  storage order, sums in double);
* ``reference`` — GROUP_NORM's reference kernel: torch's contiguous kernel on an NCHW copy,
  the result copied back channels-last (exact; what a plan runs without Kiln's kernel);
* ``torch_cl`` — torch's channels-last kernel on the image as it lies (fast, but its
  one-pass variance loses digits where the mean is large beside the spread: not used).

Error: the largest absolute difference from a float64 group norm, on inputs of mean 0 and
of mean 100 (standard deviation 0.5), relative to the largest output.

    python -m kiln.bench.group_norm [--threads 1] [--rounds 9] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = ((64, 56), (256, 56), (128, 28), (512, 28), (1024, 14), (2048, 7))  # (channels, image size)
GROUPS = 32


def run(threads: int, rounds: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    import kiln.ir.reference_library  # noqa: F401  (GROUP_NORM's reference)
    from kiln.ir import DType, GraphBuilder, Layout, LayoutKind, OpKind
    from kiln.ir import attrs as A
    from kiln.ir.reference import evaluate
    from kiln.kernels.registry import candidates

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for c, hw in SHAPES:
        w, bias = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
        b = GraphBuilder()
        x_in = b.add(OpKind.TO_LAYOUT, b.input("x", (1, c, hw, hw), DType.FLOAT32),
                     attrs=A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST)))
        g = b.build([b.add(OpKind.GROUP_NORM, x_in, b.const(w), b.const(bias), attrs=A.GroupNormAttrs(GROUPS))])
        node = g.nodes[-1]
        kernel = next(k for k in candidates(node, "cpu") if k.name == "cpu.group_norm_nhwc").bind(node, [None, w, bias])
        engines = {"kiln": lambda x: kernel([x, None, None], node.attrs),
                   "reference": lambda x: evaluate(node, [x, w, bias]),
                   "torch_cl": lambda x: F.group_norm(x, GROUPS, w, bias)}
        row = {"channels": c, "size": hw, "groups": GROUPS, "threads": threads}
        for mean in (0.0, 100.0):
            x = (torch.randn(1, c, hw, hw, generator=gen) * 0.5 + mean).contiguous(memory_format=torch.channels_last)
            want = F.group_norm(x.double(), GROUPS, w.double(), bias.double())
            scale = float(want.abs().max())
            for name, fn in engines.items():
                row[f"{name}_err_mean{int(mean)}"] = float((fn(x).double() - want).abs().max()) / scale
        x = torch.randn(1, c, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)
        times = {name: [] for name in engines}
        for _ in range(rounds):
            for name, fn in engines.items():
                fn(x)
                t = time.perf_counter()
                for _ in range(5):
                    fn(x)
                times[name].append((time.perf_counter() - t) / 5)
        row.update({f"{name}_ms": statistics.median(v) * 1e3 for name, v in times.items()})
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiln.bench.group_norm", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        ap.error("--threads and --rounds must be at least 1")
    rows = run(args.threads, args.rounds)
    print(f"group norm, {GROUPS} groups, batch 1, fp32 channels-last, {args.threads} thread(s); "
          f"ms (median of {args.rounds}); error relative to the largest output (float64 reference)")
    print("| channels x size | Kiln ms | reference ms | torch channels-last ms | reference / Kiln | "
          "Kiln err (mean 0 / 100) | torch channels-last err (mean 0 / 100) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['channels']} x {r['size']}² | {r['kiln_ms']:.3f} | {r['reference_ms']:.3f} | "
              f"{r['torch_cl_ms']:.3f} | {r['reference_ms'] / r['kiln_ms']:.2f}x | "
              f"{r['kiln_err_mean0']:.1e} / {r['kiln_err_mean100']:.1e} | "
              f"{r['torch_cl_err_mean0']:.1e} / {r['torch_cl_err_mean100']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

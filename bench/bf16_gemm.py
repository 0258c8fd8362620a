"""Microbenchmark of Kiln's AMX bf16 linear (``cpu.amx_linear``) against oneDNN's prepacked bf16
linear (``cpu.onednn_linear``), at BERT-base's shapes and in the state a model runs them in.

    python -m kiln.bench.bf16_gemm [--threads 1 2] [--layers 12] [--rows 128] [--repeats 15]

A model's forward reads each weight once, and BERT-base's 170 MB of bf16 weights do not stay
in cache between one call of a layer and the next. So each engine runs a sweep over
``--layers`` copies of one encoder layer's four GEMMs (QKV 768->2304, output projection
768->768, FFN 768->3072 with GELU, FFN 3072->768), each copy with its own weights and
input, as a model does; the two engines' sweeps alternate, and every call is timed on its
own. The table gives the median call time per shape over rounds and layers, and the ratio
oneDNN time / Kiln time (above 1: Kiln faster). Both write bf16 outputs with the bias (and
GELU) fused; Kiln's timing includes its torch <-> numpy views and output allocation, as in
a compiled plan.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

SHAPES = ((768, 2304, "none"), (768, 768, "none"), (768, 3072, "gelu"), (3072, 768, "none"))


def _layers(rows: int, layers: int) -> list[tuple]:
    from kiln import _C
    from kiln.kernels.amx_linear import bits

    out = []
    for _ in range(layers):
        for k, n, act in SHAPES:
            x = torch.randn(rows, k).bfloat16()
            w = (torch.randn(n, k) * k ** -0.5).bfloat16()
            b = torch.randn(n)
            packed_dnnl = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            out.append(((k, n, act), x, packed_dnnl, b.bfloat16(), _C.bf16_prepack(bits(w)), b.numpy()))
    return out


def _sweep_onednn(layers, rec) -> None:
    for shape, x, packed, bias, _, _ in layers:
        t = time.perf_counter()
        torch.ops.mkldnn._linear_pointwise(x, packed, bias, shape[2], [], "none" if shape[2] == "gelu" else "")
        rec[shape].append(time.perf_counter() - t)


def _sweep_kiln(layers, rec) -> None:
    from kiln import _C
    from kiln.kernels.amx_linear import bits

    threads = torch.get_num_threads()
    for shape, x, _, _, packed, bias in layers:
        t = time.perf_counter()
        y = torch.empty(x.shape[0], shape[1], dtype=torch.bfloat16)
        _C.bf16_linear(bits(x), packed, bias, None, shape[2], bits(y), threads)
        rec[shape].append(time.perf_counter() - t)


def _check(layers) -> float:
    """Largest difference between the two engines' outputs, in units of the output's scale."""
    from kiln import _C
    from kiln.kernels.amx_linear import bits

    worst = 0.0
    for shape, x, packed, bias, kpacked, kbias in layers[:len(SHAPES)]:
        ref = torch.ops.mkldnn._linear_pointwise(x, packed, bias, shape[2], [], "none" if shape[2] == "gelu" else "")
        y = torch.empty_like(ref)
        _C.bf16_linear(bits(x), kpacked, kbias, None, shape[2], bits(y), torch.get_num_threads())
        worst = max(worst, float((y.float() - ref.float()).abs().max() / ref.float().abs().max()))
    return worst


def run(threads: int, rows: int, layers: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    ls = _layers(rows, layers)
    err = _check(ls)
    engines = {"onednn": _sweep_onednn, "kiln": _sweep_kiln}
    recs = {name: collections.defaultdict(list) for name in engines}
    for fn in engines.values():
        fn(ls, collections.defaultdict(list))  # warm up
    for _ in range(repeats):
        for name, fn in engines.items():
            fn(ls, recs[name])
    print(f"threads {threads}, rows {rows}, {layers} layers (weights {sum(s[0] * s[1] for s in SHAPES) * 2 * layers / 1e6:.0f} MB)"
          f", max difference {err:.1e} of the output scale; ms per call, GF/s, oneDNN time / engine time")
    names = list(engines)
    print(f"  {'K -> N':<18}" + "".join(f"{n:>29}" for n in names))
    tot = dict.fromkeys(names, 0.0)
    for shape in recs["onednn"]:
        med = {n: statistics.median(recs[n][shape]) for n in names}
        for n in names:
            tot[n] += med[n]
        label = f"{shape[0]} -> {shape[1]}" + (" gelu" if shape[2] == "gelu" else "")
        flops = 2 * rows * shape[0] * shape[1]
        print(f"  {label:<18}" + "".join(f"{med[n] * 1e3:11.3f} {flops / med[n] / 1e9:7.0f} {med['onednn'] / med[n]:9.2f}x"
                                         for n in names))
    print(f"  {'one layer':<18}" + "".join(f"{tot[n] * 1e3:11.3f} {'':7} {tot['onednn'] / tot[n]:9.2f}x" for n in names))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    from kiln.kernels.amx_linear import supported

    if not supported():
        raise SystemExit("this CPU (or build) has no AMX-BF16: nothing to compare")
    for t in args.threads:
        run(t, args.rows, args.layers, args.repeats)


if __name__ == "__main__":
    main()

"""Two or more builds of ``kiln._C`` on the same recurrent layer, each in its own process.

Python hands back the first-loaded module when a second copy of ``kiln._C`` is loaded into
the same process by path, so builds are compared one worker process per build: the workers
build the same inputs (seeded), and the parent calls them in turn, one call each per round
(the order alternating between rounds), so a drift of the machine's speed hits every build
alike. Reported per batch size: each build's median call and the median over rounds of the
first build's time over its own (above 1: faster than the first).

A build is ``PATH[@OFFSET]``: with an offset, the worker copies the packed weights to that many
bytes past a 64-byte line before the calls (how a packing's alignment costs the kernel, on a
build that reads it in place).

    python -m kiln.bench.build_ab OLD.so NEW.so [--form layer|recurrence] [--cell lstm|gru]
                                  [--batches 1,4,7,8] [--hidden 128] [--inputs 128] [--seq 96]
                                  [--rounds 15]
    python -m kiln.bench.build_ab OLD.so@0 OLD.so@16 --form recurrence --batches 1,4

The two copies of one build also differ between processes (memory placement): read a
difference as real only where it repeats, in both orders of the builds.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys


def _worker(args) -> int:
    """One build: reads a batch size per line, runs one call, prints its seconds."""
    import importlib.util
    import time

    import numpy as np
    import torch

    torch.set_num_threads(1)
    path, _, offset = args.worker.partition("@")
    spec = importlib.util.spec_from_file_location("_C", path)
    c = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(c)
    gates = 4 if args.cell == "lstm" else 3
    T, H, I = args.seq, args.hidden, args.inputs
    torch.manual_seed(0)
    w_ih, w_hh, b = torch.randn(gates * H, I) * 0.1, torch.randn(gates * H, H) * 0.1, torch.randn(gates * H) * 0.1

    def placed(p):
        if not offset:
            return p
        buf = np.empty(p.size + 32, np.float32)
        start = (-buf.ctypes.data // 4) % 16 + int(offset) // 4
        out = buf[start:start + p.size]
        out[:] = p
        return out

    calls = {}
    for B in (int(x) for x in args.batches.split(",")):
        h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
        y, hn, cn = torch.empty(T, B, H), torch.empty(B, H), torch.empty(B, H)
        if args.form == "recurrence":
            x, p = torch.randn(T, B, gates * H), placed(c.pack_recurrent_weight(w_hh.numpy(), gates))
            calls[B] = ((lambda x=x, p=p, h0=h0, c0=c0, y=y, hn=hn, cn=cn:
                         c.lstm_recurrence(x.numpy(), p, h0.numpy(), c0.numpy(), y.numpy(), hn.numpy(), cn.numpy(), 1))
                        if gates == 4 else
                        (lambda x=x, p=p, h0=h0, y=y, hn=hn:
                         c.gru_recurrence(x.numpy(), p, b[:3 * H].numpy(), h0.numpy(), y.numpy(), hn.numpy(), 1)))
        else:
            x, p = torch.randn(T, B, I), placed(c.pack_layer_weight(w_ih.numpy(), w_hh.numpy(), b.numpy(), b.numpy(),
                                                                    gates))
            calls[B] = ((lambda x=x, p=p, h0=h0, c0=c0, y=y, hn=hn, cn=cn:
                         c.lstm_layer(x.numpy(), p, h0.numpy(), c0.numpy(), y.numpy(), hn.numpy(), cn.numpy(), 1))
                        if gates == 4 else
                        (lambda x=x, p=p, h0=h0, y=y, hn=hn:
                         c.gru_layer(x.numpy(), p, h0.numpy(), y.numpy(), hn.numpy(), 1)))
        for _ in range(3):  # warm-up, untimed
            calls[B]()
    print("ready", flush=True)
    for line in sys.stdin:
        t = time.perf_counter()
        calls[int(line)]()
        print(time.perf_counter() - t, flush=True)
    return 0


def run(builds: list[str], argv_rest: list[str], batches: list[int], rounds: int) -> list[dict]:
    workers = [subprocess.Popen([sys.executable, "-m", "kiln.bench.build_ab", "--worker", b, *argv_rest],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for b in builds]
    try:
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError("a worker failed to start (see its error above)")
        rows = []
        for B in batches:
            times = [[] for _ in workers]
            for r in range(rounds):
                order = range(len(workers)) if r % 2 == 0 else reversed(range(len(workers)))
                for i in order:
                    workers[i].stdin.write(f"{B}\n")
                    workers[i].stdin.flush()
                    times[i].append(float(workers[i].stdout.readline()))
            rows.append({"batch": B, "ms": [statistics.median(t) * 1e3 for t in times],
                         "vs_first": [statistics.median(a / b for a, b in zip(times[0], t)) for t in times]})
        return rows
    finally:
        for w in workers:
            w.stdin.close()
            w.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiln.bench.build_ab", description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="*", help="PATH[@OFFSET] of each build of kiln._C (the first is the baseline)")
    ap.add_argument("--form", choices=("layer", "recurrence"), default="layer",
                    help="the fused layer (input projection inside each step) or the hoisted recurrence")
    ap.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    ap.add_argument("--batches", default="1,4,7,8")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--inputs", type=int, default=128)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)
    if len(args.builds) < 2:
        ap.error("give at least two builds")
    rest = ["--form", args.form, "--cell", args.cell, "--batches", args.batches, "--hidden", str(args.hidden),
            "--inputs", str(args.inputs), "--seq", str(args.seq)]
    rows = run(args.builds, rest, [int(x) for x in args.batches.split(",")], args.rounds)
    print(f"{args.cell.upper()} {args.form}, {args.hidden} units, {args.inputs} inputs, {args.seq} steps, one thread; "
          f"median of {args.rounds} rounds, builds called in turn, each in its own process")
    print("| batch | " + " | ".join(f"{b} ms | vs first" for b in args.builds) + " |")
    print("|---:|" + "---:|---:|" * len(args.builds))
    for r in rows:
        print(f"| {r['batch']} | " + " | ".join(f"{m:.3f} | {v:.3f}x" for m, v in zip(r["ms"], r["vs_first"])) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

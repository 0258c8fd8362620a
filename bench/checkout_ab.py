"""Two Kiln checkouts compared end to end: did a change make any model slower?

    python -m kiln.bench.checkout_ab /path/to/baseline-checkout [--rounds 3] [--models resnet18,bert,lstm]

Two versions of Kiln cannot share one process, so each round runs ``kiln bench models``
once in the baseline checkout's environment and once in this one, alternating. Eager
PyTorch runs in every process beside Kiln, interleaved with it, so each process yields
ratios to its own eager run: the machine's drift between processes cancels out of those
ratios. The table gives, per model, engine and thread count, the median over rounds of
eager/engine for both checkouts and their quotient (this checkout / baseline; above 1 means
this checkout is faster).

Each checkout needs its own environment with Kiln installed from it (``make install`` in
the checkout: ``<checkout>/.venv``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _python(checkout: Path) -> str:
    py = checkout / ".venv" / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{checkout} has no .venv: run `make install` there first")
    return str(py)


def _run(checkout: Path, models: list[str], engines: str, threads: str, repeats: int | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "models.json")
        cmd = [_python(checkout), "-m", "kiln.cli", "bench", "models", *models, "--engines", engines,
               "--threads", threads, "--json", out]
        if repeats:
            cmd += ["--repeats", str(repeats)]
        subprocess.run(cmd, cwd=checkout, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def _speedups(result: dict, engines: list[str]) -> dict:
    """(model, engine, threads) -> eager median / engine median, from one bench run."""
    out = {}
    for r in result["results"]:
        for threads, row in r["threads"].items():
            med = row["median_ms"]
            for e in engines:
                if e != "eager" and e in med and med[e]:
                    out[(r["model"], e, int(threads))] = med["eager"] / med[e]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", type=Path, help="the other checkout (with its own .venv)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="resnet18,bert,lstm")
    ap.add_argument("--engines", default="eager,kiln,kiln_bf16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int)
    args = ap.parse_args(argv)
    models, engines = args.models.split(","), args.engines.split(",")
    samples: dict[str, dict] = {"baseline": {}, "this": {}}
    for r in range(args.rounds):
        for label, checkout in (("baseline", args.baseline.resolve()), ("this", HERE)):
            print(f"round {r + 1}/{args.rounds}: {label} ({checkout})", file=sys.stderr)
            for key, s in _speedups(_run(checkout, models, args.engines, args.threads, args.repeats), engines).items():
                samples[label].setdefault(key, []).append(s)
    print("| model | engine | threads | baseline vs eager | this vs eager | this / baseline |")
    print("|---|---|---|---|---|---|")
    for key in sorted(samples["this"]):
        a = statistics.median(samples["baseline"].get(key, [float("nan")]))
        b = statistics.median(samples["this"][key])
        print(f"| {key[0]} | {key[1]} | {key[2]} | {a:.2f}x | {b:.2f}x | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

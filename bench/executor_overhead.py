"""What Kiln's plan executor itself costs per forward: the plan's generated straight-line
function (``runtime/straightline.py``), with every kernel replaced by one that returns its
precomputed result at once.

    python -m kiln.bench.executor_overhead [models...] [--threads N]

Prints, per example model, the steps in the plan, the executor's time per forward and per
step, and that time as a share of the real forward (same process, same plan). This is the
most a C++ executor could save.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch


def _median_s(fn, repeats: int) -> float:
    from kiln.kernels.timing import interleaved

    return interleaved([fn], repeats, warmup=1)[0].median


def measure(name: str, repeats: int = 200) -> dict:
    import kiln
    from kiln import models

    model, inputs = models.get(name)
    compiled = kiln.compile(model, inputs)
    plan = compiled.compiled[0].plan
    with torch.no_grad():
        instant = []  # run once for real; each step then replays its own result
        plan.interpret(list(inputs), lambda s, r: instant.append(dataclasses.replace(s, fn=lambda ins, a, r=r: r)))
        hollow = dataclasses.replace(plan, steps=tuple(instant))
        overhead = _median_s(lambda: hollow.run(list(inputs)), repeats)
        real = _median_s(lambda: plan.run(list(inputs)), max(5, repeats // 20))
    return {"model": name, "steps": len(plan.steps), "overhead_us": overhead * 1e6,
            "per_step_us": overhead * 1e6 / len(plan.steps), "forward_ms": real * 1e3,
            "share": overhead / real}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["resnet18", "bert", "lstm"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | steps | executor us/forward | us/step | forward ms | executor share |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name)
        print(f"| {r['model']} | {r['steps']} | {r['overhead_us']:.0f} | {r['per_step_us']:.2f} | "
              f"{r['forward_ms']:.1f} | {r['share'] * 100:.2f}% |")


if __name__ == "__main__":
    main()

"""bf16 top-1 agreement: does ``precision="bf16"`` pick the same class as fp32?

For each example classifier (ResNet-18, the BERT-style encoder), ``n`` random inputs
(seeded: images from N(0, 1), token ids uniform over the vocabulary) run through eager
fp32 PyTorch and through Kiln with ``precision="bf16"``; the table shows how often the
argmax agrees, and the largest logit error relative to the largest fp32 logit.

    python -m kiln.bench.bf16_agreement [--n 100] [resnet18 bert]
"""
from __future__ import annotations

import argparse

import torch

import kiln
from kiln.demo import first_tensor


def _random_input(name: str, example: tuple, g: torch.Generator) -> tuple:
    x = example[0]
    if x.dtype == torch.int64:  # token ids
        return (torch.randint(0, 30000, x.shape, generator=g),) + tuple(example[1:])
    return (torch.randn(x.shape, generator=g),) + tuple(example[1:])


def agreement(name: str, n: int = 100, seed: int = 0) -> dict:
    model, example = kiln.models.get(name)
    fast = kiln.compile(model, example, precision="bf16")
    g = torch.Generator().manual_seed(seed)
    agree, worst = 0, 0.0
    with torch.no_grad():
        for _ in range(n):
            inp = _random_input(name, example, g)
            ref = first_tensor(model(*inp)).float()
            out = first_tensor(fast(*inp)).float()
            agree += int(torch.equal(ref.argmax(-1), out.argmax(-1)))
            worst = max(worst, float((out - ref).abs().max()) / max(float(ref.abs().max()), 1e-6))
    return {"model": name, "inputs": n, "agree": agree, "rate": agree / n, "max_rel_err": worst}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["resnet18", "bert"])
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args(argv)
    print("| model | inputs | top-1 agreement | max |logit error| / max |fp32 logit| |")
    print("|---|---|---|---|")
    for name in args.models:
        r = agreement(name, args.n)
        print(f"| {name} | {r['inputs']} | {r['agree']}/{r['inputs']} ({100 * r['rate']:.0f}%) | {r['max_rel_err']:.2e} |",
              flush=True)


if __name__ == "__main__":
    main()

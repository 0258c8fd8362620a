"""Sparsity figures: sparse GEMM vs dense torch, a pruned digits CNN, a block-sparse BERT.

    python -m kiln.bench.sparse                 # all three, 1 thread
    python -m kiln.bench.sparse --threads 2 --only gemm

1. GEMM: x [128, 4096] @ W^T with W [1024, 4096] at 50/75/90% sparsity, unstructured
   (Kiln's CSR kernel) and block(4,4) (BSR): speedup over dense ``torch.nn.functional.linear``
   (ratios of medians; dense and sparse runs interleaved), and the crossover sparsity
   (the lowest measured sparsity where the sparse kernel wins).
2. A CNN trained on scikit-learn's digits, pruned to 75% block(4,4) sparsity with
   distillation recovery: top-1 of dense vs pruned, and latency of dense Kiln vs sparse Kiln.
3. BERT-base-style model (kiln.models.bert) with 80% block(4,4)-sparse FFN weights:
   end-to-end latency of dense Kiln vs sparse Kiln.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def _interleaved(fns: list, repeats: int) -> list[float]:
    times = [[] for _ in fns]
    with torch.no_grad():
        for f in fns:
            f()
        for _ in range(repeats):
            for i, f in enumerate(fns):
                t = time.perf_counter()
                f()
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e3 for t in times]


# ----------------------------------------------------------------------------- 1. GEMM
def gemm(threads: int, repeats: int = 15, m: int = 128, n: int = 1024, k: int = 4096,
         levels=(0.5, 0.75, 0.9)) -> list[dict]:
    from kiln import _C
    from kiln.ir import sparse as S
    from kiln.pruning import weight_mask

    torch.manual_seed(0)
    x = torch.randn(m, k)
    rows = []
    for pattern, layout in (("unstructured", S.CSR), ("block(4,4)", S.bsr(4, 4))):
        for sp in levels:
            w = torch.randn(n, k)
            w = w * weight_mask(w, sp, pattern)
            e = S.encode(w, layout)
            bh, bw = S.block_of(layout)
            y = torch.empty(m, n)
            args = (e.values.numpy(), e.indices.numpy(), e.indptr.numpy(), n, bh, bw, None, None, 0, y.numpy(), threads)
            ref = F.linear(x, w)
            _C.sparse_linear(x.numpy(), *args)
            assert torch.allclose(y, ref, rtol=1e-4, atol=1e-3), "sparse kernel disagrees with dense"
            dense_ms, sparse_ms = _interleaved([lambda: F.linear(x, w), lambda: _C.sparse_linear(x.numpy(), *args)],
                                               repeats)
            rows.append(dict(pattern=pattern, sparsity=sp, dense_ms=dense_ms, sparse_ms=sparse_ms,
                             speedup=dense_ms / sparse_ms))
    return rows


def crossover(rows: list[dict], pattern: str) -> str:
    wins = [r["sparsity"] for r in rows if r["pattern"] == pattern and r["speedup"] > 1.0]
    return f"{min(wins):.0%}" if wins else "above the largest sparsity measured"


# ----------------------------------------------------------------------------- 2. digits CNN
class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32, hidden: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.fc1 = nn.Linear(4 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits_data(seed: int = 0):
    """scikit-learn's digits as ([N,1,8,8] float in [0,1], labels), split 80/20 with a seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    return (x[tr], y[tr]), (x[te], y[te])


def batches(x, y, size: int, seed: int = 0):
    """A re-iterable of shuffled (x, y) batches, a new order each pass, seeded."""
    class Loader:
        def __init__(self):
            self.g = torch.Generator().manual_seed(seed)

        def __iter__(self):
            perm = torch.randperm(len(y), generator=self.g)
            for i in range(0, len(y) - size + 1, size):
                idx = perm[i:i + size]
                yield x[idx], y[idx]
    return Loader()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train_digits(seed: int = 0, epochs: int = 6, width: int = 32, hidden: int = 256):
    """A DigitsCNN trained from a seed in seconds (on an idle core); returns (model, train, test)."""
    torch.manual_seed(seed)
    train, test = digits_data(seed)
    model = DigitsCNN(width, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for xb, yb in _epochs(batches(*train, 32, seed), epochs):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), train, test


def _epochs(loader, n):
    for _ in range(n):
        yield from loader


def pruned_digits(model, train, sparsity: float = 0.75, steps: int = 300, seed: int = 0):
    """Every layer but the first conv (9 inputs) and the classifier pruned to ``sparsity`` block(4,4), then distilled."""
    import kiln

    torch.manual_seed(seed)
    return kiln.sparsify(model, sparsity, "block(4,4)", layers=["conv2", "conv3", "fc1"],
                         data=batches(*train, 32, seed + 1), steps=steps, lr=1e-3)


def digits(threads: int, repeats: int = 30) -> dict:
    import kiln
    from kiln.pruning import layer_sparsity

    model, train, test = train_digits()
    pruned = pruned_digits(model, train)
    out = dict(dense_top1=accuracy(model, *test), pruned_top1=accuracy(pruned, *test),
               layer_sparsity=layer_sparsity(pruned))
    for batch in (1, 64):
        x = test[0][:batch]
        dense_k = kiln.compile(pruned, (x,), sparse="off")
        sparse_k = kiln.compile(pruned, (x,), sparse="auto")
        out[f"formats_b{batch}"] = {d.layer: d.format for d in sparse_k.compiled[0].report.sparsity}
        d_ms, s_ms = _interleaved([lambda: dense_k(x), lambda: sparse_k(x)], repeats)
        out[f"b{batch}"] = dict(dense_kiln_ms=d_ms, sparse_kiln_ms=s_ms, speedup=d_ms / s_ms)
    return out


# ----------------------------------------------------------------------------- 3. BERT
def bert(threads: int, repeats: int = 5, layers: int = 12, seq: int = 128) -> dict:
    import kiln
    from kiln import models

    model, inputs = models.bert(layers=layers, seq=seq)
    pruned = kiln.sparsify(model, 0.8, "block(4,4)", layers=["layers.*.fc1", "layers.*.fc2"])
    dense_k = kiln.compile(pruned, inputs, sparse="off")
    sparse_k = kiln.compile(pruned, inputs, sparse="auto")
    chosen = [d.format for d in sparse_k.compiled[0].report.sparsity]
    with torch.no_grad():
        diff = float((dense_k(*inputs) - sparse_k(*inputs)).abs().max())
    d_ms, s_ms = _interleaved([lambda: dense_k(*inputs), lambda: sparse_k(*inputs)], repeats)
    return dict(layers=layers, seq=seq, sparse_layers=sum(f != "dense" for f in chosen), considered=len(chosen),
                dense_kiln_ms=d_ms, sparse_kiln_ms=s_ms, speedup=d_ms / s_ms, max_output_diff=diff)


def mlp():
    """A small MLP and inputs (a model reference for ``kiln sparsity-report kiln.bench.sparse:mlp``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10))
    return model.eval(), (torch.randn(32, 256),)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["gemm", "digits", "bert"])
    p.add_argument("--bert-layers", type=int, default=12)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads}")
    if args.only in (None, "gemm"):
        rows = gemm(args.threads)
        print("\nsparse GEMM x[128,4096] @ W[1024,4096]^T: dense torch vs Kiln sparse kernel (median ms)")
        print(f"{'pattern':<14}{'sparsity':>9}{'dense ms':>10}{'sparse ms':>11}{'speedup':>9}")
        for r in rows:
            print(f"{r['pattern']:<14}{r['sparsity']:>9.0%}{r['dense_ms']:>10.3f}{r['sparse_ms']:>11.3f}"
                  f"{r['speedup']:>8.2f}x")
        for pat in ("unstructured", "block(4,4)"):
            print(f"crossover ({pat}): sparse wins from {crossover(rows, pat)}")
    if args.only in (None, "digits"):
        d = digits(args.threads)
        print(f"\ndigits CNN: top-1 dense {d['dense_top1']:.2%}, pruned 75% block(4,4) + distillation "
              f"{d['pruned_top1']:.2%} ({(d['pruned_top1'] - d['dense_top1']) * 100:+.2f} points)")
        print("  layer sparsity: " + ", ".join(f"{k} {v:.1%}" for k, v in d["layer_sparsity"].items()))
        for b in (1, 64):
            r = d[f"b{b}"]
            print(f"  batch {b}: dense Kiln {r['dense_kiln_ms']:.3f} ms, sparse Kiln {r['sparse_kiln_ms']:.3f} ms "
                  f"({r['speedup']:.2f}x); formats {d[f'formats_b{b}']}")
    if args.only in (None, "bert"):
        b = bert(args.threads, layers=args.bert_layers)
        print(f"\nBERT-base ({b['layers']} layers, seq {b['seq']}), FFN weights 80% block(4,4): dense Kiln "
              f"{b['dense_kiln_ms']:.1f} ms, sparse Kiln {b['sparse_kiln_ms']:.1f} ms ({b['speedup']:.2f}x); "
              f"{b['sparse_layers']}/{b['considered']} layers sparse; max output diff {b['max_output_diff']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

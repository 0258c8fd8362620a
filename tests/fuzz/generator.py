"""Seeded random models for differential fuzzing: a spec (a list of op records) drives an
``nn.Module`` whose forward interprets it.

Every op checks its preconditions against the current tensor and is skipped when they
fail, so any sub-list of a spec is still a valid model — which is what lets a failing
case shrink by deleting ops one at a time.
"""
from __future__ import annotations

import json
import math
import random

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_OPS = ["conv", "bn", "act", "pool", "residual_conv", "scale_shift", "global_mean", "flatten"]
SEQ_OPS = ["linear", "layernorm", "act", "softmax", "attention", "residual_linear", "scale_shift", "seq_mean",
           "reduce_sub", "where", "clamp"]
VEC_OPS = ["linear", "act", "layernorm", "softmax", "scale_shift", "unsqueeze_seq", "reduce_sub", "where", "clamp"]
ACTS = ["relu", "gelu", "tanh", "sigmoid", "silu", "gelu_tanh"]


def random_spec(seed: int) -> dict:
    r = random.Random(seed)
    kind = r.choice(["image", "seq", "vec"])
    shape = {"image": [r.choice([1, 2]), r.choice([3, 4, 8]), r.choice([6, 8]), r.choice([6, 8])],
             "seq": [r.choice([1, 2]), r.choice([4, 5, 8]), r.choice([8, 16])],
             "vec": [r.choice([1, 3]), r.choice([8, 12, 16])]}[kind]
    ops = []
    for _ in range(r.randint(2, 8)):
        pool = {"image": IMAGE_OPS, "seq": SEQ_OPS, "vec": VEC_OPS}[kind]
        op = r.choice(pool)
        rec = {"op": op, "act": r.choice(ACTS), "out": r.choice([4, 8, 16]), "k": r.choice([1, 3]),
               "stride": r.choice([1, 1, 2]), "c": round(r.uniform(-2, 2), 3), "heads": r.choice([1, 2, 4])}
        ops.append(rec)
        if op in ("global_mean", "flatten", "seq_mean"):
            kind = "vec"
        elif op == "unsqueeze_seq":
            kind = "seq"
    return {"seed": seed, "input": shape, "ops": ops}


class SpecModel(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        torch.manual_seed(spec["seed"])
        self.spec = spec
        self.mods = nn.ModuleList()
        x = torch.zeros(spec["input"])
        self.plan = []
        for rec in spec["ops"]:
            mod = self._build(rec, x)
            if mod is None:
                continue  # precondition failed: skipped (keeps every sub-list valid)
            self.mods.append((mod if isinstance(mod, nn.Module) else nn.Identity()).eval())
            self.plan.append(rec)
            with torch.no_grad():
                x = self._apply(rec, self.mods[-1], x)
        self.eval()
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)

    def _build(self, rec, x):
        op, d = rec["op"], x.dim()
        if op == "conv" and d == 4:
            k = rec["k"]
            if x.shape[2] < k or x.shape[3] < k:
                return None
            return nn.Conv2d(x.shape[1], rec["out"], k, rec["stride"], k // 2)
        if op == "residual_conv" and d == 4:
            return nn.Conv2d(x.shape[1], x.shape[1], 3, 1, 1)
        if op == "bn" and d == 4:
            return nn.BatchNorm2d(x.shape[1])
        if op == "pool" and d == 4 and x.shape[2] >= 2 and x.shape[3] >= 2:
            return True
        if op in ("global_mean", "flatten") and d == 4:
            return True
        if op == "linear" and d in (2, 3):
            return nn.Linear(x.shape[-1], rec["out"])
        if op == "residual_linear" and d in (2, 3):
            return nn.Linear(x.shape[-1], x.shape[-1])
        if op == "layernorm" and d in (2, 3):
            return nn.LayerNorm(x.shape[-1])
        if op == "attention" and d == 3 and x.shape[-1] % rec["heads"] == 0:
            return nn.Linear(x.shape[-1], 3 * x.shape[-1])
        if op in ("seq_mean",) and d == 3:
            return True
        if op == "unsqueeze_seq" and d == 2:
            return True
        if op in ("act", "scale_shift", "softmax", "reduce_sub", "where", "clamp"):
            return True
        return None

    def _apply(self, rec, mod, x):
        op = rec["op"]
        if op in ("conv", "linear", "bn", "layernorm"):
            return mod(x)
        if op in ("residual_conv", "residual_linear"):
            return x + mod(x)
        if op == "act":
            a = rec["act"]
            return {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu,
                    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[a](x)
        if op == "pool":
            return F.max_pool2d(x, 2) if rec["k"] == 1 else F.avg_pool2d(x, 2)
        if op == "global_mean":
            return x.mean((2, 3))
        if op == "flatten":
            return torch.flatten(x, 1)
        if op == "seq_mean":
            return x.mean(1)
        if op == "unsqueeze_seq":
            return x.unsqueeze(1).expand(x.shape[0], 3, x.shape[1]) * torch.arange(1, 4).view(1, 3, 1)
        if op == "scale_shift":
            return x * rec["c"] + 0.5
        if op == "softmax":
            return torch.softmax(x, -1)
        if op == "reduce_sub":
            return x - x.amax(-1, keepdim=True) + x.sum(-1, keepdim=True) / x.shape[-1]
        if op == "where":
            return torch.where(x > 0, x, x * rec["c"])
        if op == "clamp":
            return x.clamp(-abs(rec["c"]), abs(rec["c"]) + 0.1)
        if op == "attention":
            b, s, dm = x.shape
            h = rec["heads"]
            q, k, v = mod(x).split(dm, -1)
            q, k, v = (t.view(b, s, h, dm // h).transpose(1, 2) for t in (q, k, v))
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dm // h), -1)
            return (p @ v).transpose(1, 2).reshape(b, s, dm)
        raise AssertionError(op)

    def forward(self, x):
        for rec, mod in zip(self.plan, self.mods):
            x = self._apply(rec, mod, x)
        return x


def build(spec: dict):
    torch.manual_seed(spec["seed"] + 1)
    return SpecModel(spec), torch.randn(spec["input"])


def check(spec: dict, rel: float = 1e-4) -> str | None:
    """Compile the spec's model with Kiln; a description of the mismatch, or None."""
    import kiln

    model, x = build(spec)
    with torch.no_grad():
        want = model(x)
    try:
        got = kiln.compile(model, (x,))(x)
    except Exception as e:  # a crash is a failure too
        return f"{type(e).__name__}: {e}"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"got {got.dtype}{tuple(got.shape)}, eager {want.dtype}{tuple(want.shape)}"
    err = (got - want).abs().max().item()
    tol = rel * max(1.0, want.abs().max().item())
    if not err <= tol:  # also catches NaN
        return f"max abs error {err:.3g} > {tol:.3g}"
    return None


def shrink(spec: dict) -> dict:
    """Delete ops one at a time while the failure persists: a minimal failing spec."""
    cur = dict(spec, ops=list(spec["ops"]))
    changed = True
    while changed:
        changed = False
        for i in range(len(cur["ops"])):
            trial = dict(cur, ops=cur["ops"][:i] + cur["ops"][i + 1:])
            if trial["ops"] and check(trial) is not None:
                cur, changed = trial, True
                break
    return cur


def save_regression(spec: dict, directory: str) -> str:
    """Writes ``spec`` as ``<directory>/seed<seed>.json`` (a ``"note"`` key, when present,
    says what the case exercises; ``build`` ignores it)."""
    import os

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"seed{spec['seed']}.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    return path

"""``kiln.sparsify``: magnitude pruning of a model's weights, with optional recovery by
distillation from the dense model.

    sparse = kiln.sparsify(model, sparsity=0.75, pattern="block(4,4)")
    sparse = kiln.sparsify(model, 0.75, "block(4,4)", data=loader, steps=300)  # + recovery

Patterns, over each weight as a matrix [out, in] (a convolution's [co, ci*kh*kw]):

- ``"unstructured"``: the ``round(sparsity * numel)`` smallest-magnitude weights become zero.
- ``"block(r,c)"``: the matrix is cut into r x c blocks (edge blocks are partial) and the
  ``round(sparsity * blocks)`` blocks of smallest L2 norm become zero.
- ``"2:4"``: in every group of four consecutive inputs, the two smallest become zero
  (``sparsity`` must be 0.5; layers whose input count is not a multiple of 4 are skipped).
- ``"channel"``: the ``round(sparsity * out)`` output channels (rows) of smallest L2
  norm become zero (biases are kept: those channels output their bias).

The counts are exact per layer. The model is copied; the original is untouched. The
pruned modules are ``nn.Linear`` and groups-1 ``nn.Conv2d``, all of them unless ``layers``
(module names, fnmatch patterns, or a predicate ``(name, module) -> bool``) selects some.
"""
from __future__ import annotations

import copy
import fnmatch
import re
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import KilnError

PATTERNS = ("unstructured", "block(r,c)", "2:4", "channel")


def _parse_pattern(pattern: str) -> tuple[str, tuple[int, int]]:
    p = pattern.replace(" ", "").lower()
    if p in ("unstructured", "2:4", "channel"):
        return p, (1, 1)
    m = re.fullmatch(r"block\((\d+),(\d+)\)", p)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        return "block", (int(m.group(1)), int(m.group(2)))
    raise KilnError(f"unknown sparsity pattern {pattern!r}; expected one of {', '.join(PATTERNS)}")


def prunable_layers(model: nn.Module, layers=None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``sparsify`` would prune."""
    out = []
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)):
            continue
        if layers is None:
            out.append((name, m))
        elif callable(layers):
            if layers(name, m):
                out.append((name, m))
        elif any(fnmatch.fnmatchcase(name, pat) for pat in ([layers] if isinstance(layers, str) else layers)):
            out.append((name, m))
    return out


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of exactly ``count`` lowest entries (ties broken by position)."""
    flat = scores.reshape(-1)
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    if count > 0:
        drop[torch.argsort(flat, stable=True)[:count]] = True
    return drop.reshape(scores.shape)


def weight_mask(w: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor | None:
    """The keep-mask (same shape as ``w``) of one layer; None when the pattern cannot apply."""
    kind, (r, c) = _parse_pattern(pattern)
    m2 = w.detach().reshape(w.shape[0], -1).abs().float()
    n, k = m2.shape
    if kind == "unstructured":
        keep = ~_lowest(m2, round(sparsity * m2.numel()))
    elif kind == "channel":
        keep = ~_lowest(m2.pow(2).sum(1), round(sparsity * n))[:, None].expand(n, k)
    elif kind == "2:4":
        if k % 4:
            return None
        g = m2.reshape(n, k // 4, 4)
        top = g.topk(2, dim=-1, sorted=False).indices  # ties: topk picks two distinct positions
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True).reshape(n, k)
    else:
        rows, cols = -(-n // r), -(-k // c)
        padded = torch.zeros(rows * r, cols * c)
        padded[:n, :k] = m2
        norms = padded.pow(2).reshape(rows, r, cols, c).sum((1, 3))
        drop = _lowest(norms, round(sparsity * rows * cols))
        keep = ~drop.repeat_interleave(r, 0).repeat_interleave(c, 1)[:n, :k]
    return keep.reshape(w.shape)


def sparsify(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured", layers=None, *,
             data: Iterable | None = None, steps: int = 0, lr: float = 1e-3, temperature: float = 2.0,
             alpha: float = 0.5, loss_fn: Callable | None = None) -> nn.Module:
    """Return a pruned copy of ``model`` (see the module doc for patterns and ``layers``).

    With ``data`` (an iterable of ``(inputs, targets)``, e.g. a DataLoader) and ``steps``,
    the pruned copy is then fine-tuned for ``steps`` optimizer steps by distillation from
    the dense model (``distill``), with the pruning masks held fixed.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise KilnError(f"sparsity must be in [0, 1], got {sparsity}")
    kind, _ = _parse_pattern(pattern)
    if kind == "2:4" and sparsity != 0.5:
        raise KilnError("the 2:4 pattern has sparsity 0.5 (two of every four weights); pass sparsity=0.5")
    pruned = copy.deepcopy(model)
    selected = prunable_layers(pruned, layers)
    if not selected:
        raise KilnError("no Linear or Conv2d layer to prune" + (f" matches layers={layers!r}" if layers else ""))
    masks = {}
    with torch.no_grad():
        for name, m in selected:
            keep = weight_mask(m.weight, sparsity, pattern)
            if keep is None:
                continue  # e.g. 2:4 over an input count that is not a multiple of 4
            m.weight.mul_(keep.to(m.weight.dtype))
            masks[name] = keep
    if data is not None and steps > 0:
        distill(pruned, model, data, steps, masks=masks, lr=lr, temperature=temperature, alpha=alpha, loss_fn=loss_fn)
    return pruned.eval()


def _cycle(data: Iterable):
    """The batches of ``data`` over and over (a one-shot iterator ends when it runs dry)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            return


def _call(model, inputs):
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def distill(student: nn.Module, teacher: nn.Module, data: Iterable, steps: int, masks: dict | None = None,
            lr: float = 1e-3, temperature: float = 2.0, alpha: float = 0.5, loss_fn: Callable | None = None) -> nn.Module:
    """Fine-tune ``student`` for ``steps`` steps on ``alpha * T^2 KL(teacher/T || student/T)
    + (1 - alpha) * task loss`` (cross-entropy unless ``loss_fn(logits, targets)``).

    ``masks`` (module name -> keep-mask; default: the nonzeros of every prunable layer)
    stay fixed: pruned weights get no gradient and stay exactly zero. ``data`` is iterated
    as often as needed to reach ``steps``.
    """
    modules = dict(student.named_modules())
    if masks is None:
        masks = {n: m.weight.detach() != 0 for n, m in prunable_layers(student)}
    keep = {modules[n].weight: k.to(modules[n].weight.dtype) for n, k in masks.items()}
    loss_fn = loss_fn or F.cross_entropy
    teacher = teacher.eval()
    student.train()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    for _, (inputs, targets) in zip(range(steps), _cycle(data)):
        with torch.no_grad():
            t_logits = _call(teacher, inputs)
        s_logits = _call(student, inputs)
        kl = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                      reduction="batchmean", log_target=True) * temperature ** 2
        loss = alpha * kl + (1 - alpha) * loss_fn(s_logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, k in keep.items():
            if p.grad is not None:
                p.grad.mul_(k)
        opt.step()
        with torch.no_grad():  # Adam's moments could still move a masked weight: pin it
            for p, k in keep.items():
                p.mul_(k)
    return student.eval()


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights of every prunable layer."""
    return {n: float((m.weight == 0).sum()) / m.weight.numel() for n, m in prunable_layers(model)}

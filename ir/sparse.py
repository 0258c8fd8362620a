"""Encodings of sparse weights in the IR: what the constants of SPARSE_LINEAR/SPARSE_CONV2D hold.

A sparse [n, k] weight is stored as (values, indices, indptr) constants:

- CSR (``Layout(SPARSE_CSR)``): values [nnz], column indices int32 [nnz] (increasing
  within a row), row pointers int32 [n + 1].
- BSR (``Layout(SPARSE_BSR, (bh, bw))``): the weight padded to multiples of the block,
  values [nnz_blocks, bh, bw], block-column indices int32, block-row pointers int32
  [ceil(n / bh) + 1]. CSR is BSR with 1x1 blocks, and the CPU kernel treats it so.
- 2:4 (``Layout(SPARSE_24)``): in every group of four along k at most two nonzeros;
  values [n, k/2] (the two kept, in order) and their int8 positions 0..3 in the group;
  no row pointers.

Every function here is exact: ``densify(encode(w))`` is ``w`` bit for bit.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .types import Layout, LayoutKind

CSR = Layout(LayoutKind.SPARSE_CSR)
SPARSE_24 = Layout(LayoutKind.SPARSE_24)


def bsr(bh: int, bw: int) -> Layout:
    return Layout(LayoutKind.SPARSE_BSR, (bh, bw))


class Encoded(NamedTuple):
    layout: Layout
    values: torch.Tensor
    indices: torch.Tensor
    indptr: torch.Tensor | None


def block_of(layout: Layout) -> tuple[int, int]:
    return tuple(layout.block) if layout.kind is LayoutKind.SPARSE_BSR else (1, 1)


def is_24(w: torch.Tensor) -> bool:
    """At most two nonzeros in every group of four along the last axis."""
    k = w.shape[-1]
    return k % 4 == 0 and bool(((w.reshape(-1, k // 4, 4) != 0).sum(-1) <= 2).all())


def encode(w: torch.Tensor, layout: Layout) -> Encoded:
    """Compress a dense 2-D weight into ``layout``."""
    w = w.detach().contiguous()
    if w.dim() != 2:
        raise ValueError(f"sparse weights are 2-D, got shape {tuple(w.shape)}")
    if layout.kind is LayoutKind.SPARSE_24:
        return _encode_24(w)
    bh, bw = block_of(layout)
    n, k = w.shape
    rows, cols = -(-n // bh), -(-k // bw)
    wp = torch.zeros(rows * bh, cols * bw, dtype=w.dtype)
    wp[:n, :k] = w
    blocks = wp.reshape(rows, bh, cols, bw).permute(0, 2, 1, 3)  # [rows, cols, bh, bw]
    nz = (blocks != 0).flatten(2).any(-1)
    indptr = torch.zeros(rows + 1, dtype=torch.int32)
    indptr[1:] = nz.sum(1).cumsum(0)
    r, c = nz.nonzero(as_tuple=True)  # row-major order: columns increase within a row
    values = blocks[r, c].contiguous()
    if layout.kind is LayoutKind.SPARSE_CSR:
        values = values.reshape(-1)
    return Encoded(layout, values, c.to(torch.int32), indptr)


def _encode_24(w: torch.Tensor) -> Encoded:
    n, k = w.shape
    if not is_24(w):
        raise ValueError("weight is not 2:4 sparse (more than two nonzeros in a group of four)")
    g = w.reshape(n, k // 4, 4)
    # keep the nonzeros first (stable, so positions stay increasing), then pad with zeros
    order = torch.sort((g == 0).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    vals = torch.gather(g, -1, order)
    return Encoded(SPARSE_24, vals.reshape(n, k // 2).contiguous(), order.to(torch.int8).reshape(n, k // 2).contiguous(),
                   None)


def densify(layout: Layout, shape: tuple[int, int], values: torch.Tensor, indices: torch.Tensor,
            indptr: torch.Tensor | None) -> torch.Tensor:
    """The dense [n, k] weight an encoding stands for."""
    n, k = shape
    if layout.kind is LayoutKind.SPARSE_24:
        g = torch.zeros(n, k // 4, 4, dtype=values.dtype)
        g.scatter_(-1, indices.reshape(n, k // 4, 2).long(), values.reshape(n, k // 4, 2))
        return g.reshape(n, k)
    bh, bw = block_of(layout)
    rows, cols = -(-n // bh), -(-k // bw)
    counts = (indptr[1:] - indptr[:-1]).long()
    r = torch.repeat_interleave(torch.arange(rows), counts)
    blocks = torch.zeros(rows, cols, bh, bw, dtype=values.dtype)
    blocks[r, indices.long()] = values.reshape(-1, bh, bw)
    return blocks.permute(0, 2, 1, 3).reshape(rows * bh, cols * bw)[:n, :k].contiguous()


def nbytes(e: Encoded) -> int:
    return sum(t.numel() * t.element_size() for t in (e.values, e.indices, e.indptr) if t is not None)

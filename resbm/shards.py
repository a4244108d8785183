"""Reading and writing one shard's range of a stage's {name: tensor} dict, without building the
whole flat vector, so a merge can stream shard by shard. The layout itself and the merger
assignment are pure and torch-free (`spec.shard_layout`, which the bridge uses too); they are
re-exported here for resbm's callers.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from spec.shard_layout import ShardLayout, assign_mergers, layout, shards_of

__all__ = ["ShardLayout", "layout", "take", "put", "assign_mergers", "shards_of"]


def _pieces(tensors: Mapping[str, torch.Tensor], start: int, end: int):
    off = 0
    for n in sorted(tensors):
        t = tensors[n]
        k = t.numel()
        lo, hi = max(start, off), min(end, off + k)
        if lo < hi:
            yield t, lo - off, hi - off
        off += k
        if off >= end:
            return


def take(tensors: Mapping[str, torch.Tensor], start: int, end: int) -> torch.Tensor:
    """An fp32 copy of flat range [start, end) of `tensors` (sorted-name order), on their device."""
    parts = [t.detach().reshape(-1)[a:b].to(dtype=torch.float32) for t, a, b in _pieces(tensors, start, end)]
    out = torch.cat(parts) if parts else torch.zeros(0)
    if out.numel() != end - start:
        raise ValueError(f"range [{start}, {end}) is outside the {sum(t.numel() for t in tensors.values())} values")
    return out.contiguous()


def put(tensors: Mapping[str, torch.Tensor], start: int, vec: torch.Tensor) -> None:
    """Write `vec` into flat range [start, start + len(vec)) of `tensors`, in place."""
    off = 0
    for t, a, b in _pieces(tensors, start, start + vec.numel()):
        t.view(-1)[a:b] = vec[off:off + b - a].to(t.dtype)
        off += b - a
    if off != vec.numel():
        raise ValueError("vector runs past the end of the tensors")

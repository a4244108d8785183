"""Shards of a stage's parameter vector and who merges each one in a round.

The stage's parameters, flattened in sorted-name order, form one vector of N values. It is cut
into contiguous shards of equal length (a multiple of the codec block, so a block never spans two
shards; the last shard is shorter). `take` and `put` read and write one shard's range of a
{name: tensor} dict without building the whole flat vector, so a merge can stream shard by shard.

`assign_mergers` is a pure function of (round, stage, replica hotkeys, shard count, mergers per
shard): every replica and the bridge compute the same table. Each shard is merged by
min(mergers, R) distinct replicas taken round-robin from a per-round hash order, so each replica
merges about shards x mergers / R shards and downloads about mergers x N pseudo-gradient values
per round whatever R is.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["ShardLayout", "layout", "take", "put", "assign_mergers", "shards_of"]


class ShardLayout(tuple):
    """((start, end), ...) ranges of the flat vector, and the vector's length `total`."""

    total: int

    def __new__(cls, ranges: Sequence[tuple[int, int]], total: int) -> "ShardLayout":
        obj = super().__new__(cls, tuple(ranges))
        obj.total = total
        return obj


def layout(shapes: Mapping[str, Sequence[int]], n_shards: int, block: int) -> ShardLayout:
    """Equal contiguous shards (block-aligned); fewer than `n_shards` when the stage is small."""
    if n_shards < 1 or block < 1:
        raise ValueError(f"need n_shards >= 1 and block >= 1, got {n_shards}, {block}")
    total = sum(math.prod(shapes[n]) for n in sorted(shapes))
    blocks = max(1, math.ceil(total / block))
    per = math.ceil(blocks / min(n_shards, blocks)) * block
    ranges = [(s, min(total, s + per)) for s in range(0, max(total, 1), per)]
    return ShardLayout(ranges, total)


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


def _order(round_: int, stage: int, hotkeys: Sequence[str]) -> list[str]:
    def key(h: str) -> str:
        return hashlib.sha256(f"resbm-shards:{round_}:{stage}:{h}".encode()).hexdigest()
    return sorted(set(hotkeys), key=lambda h: (key(h), h))


def assign_mergers(round_: int, stage: int, hotkeys: Sequence[str], n_shards: int,
                   mergers: int) -> list[list[str]]:
    """For each shard, the replicas (hotkeys) that merge it this round; [] without replicas."""
    if n_shards < 1 or mergers < 1:
        raise ValueError(f"need n_shards >= 1 and mergers >= 1, got {n_shards}, {mergers}")
    order = _order(round_, stage, hotkeys)
    r = len(order)
    if r == 0:
        return [[] for _ in range(n_shards)]
    m = min(mergers, r)
    return [sorted(order[(s * m + j) % r] for j in range(m)) for s in range(n_shards)]


def shards_of(table: Sequence[Sequence[str]], hotkey: str) -> list[int]:
    """The shards `hotkey` merges in an assignment table."""
    return [s for s, hs in enumerate(table) if hotkey in hs]

"""The robust merge and the outer step, one shard at a time.

Each shard is merged on its own with resbm.robust_merge's rules (screening, capped weights,
trimmed mean), the shard treated as one tensor. Clipping is per shard: every replica's shard
slice is scaled down to `clip_factor x ref_s`, where ref_s is the lower median of this round's
norms of that shard's slices, floored at `ref_floor x` the shard's previous ref (carried in the
state as one fp32 per shard). The lower median and the floor are the same order statistics as
the global rule, so one attacker alone can neither raise a shard's bound above an honest norm
nor shrink it to nothing; it can at most spend its bound on every shard, which is what the
global bound allowed too (sqrt(S) x a per-shard share of it).

The merged shard is encoded with the run's merged-update codec and everyone applies the
*decoded* vector, so the replicas that merged it and those that downloaded it reach the same
bytes. The outer step is element-wise (Nesterov), so applying it shard by shard equals applying
it to the whole state. A joiner replays the merged updates since the last full checkpoint.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from resbm.outer import nesterov_step
from resbm.robust_merge import MergeParams, robust_merge, screen
from resbm.shards import ShardLayout, put, take
from resbm.sync_codec import Codec, roundtrip

__all__ = ["ShardMerge", "merge_shard", "apply_shard", "apply_update", "zero_momentum", "catch_up"]

Tensors = dict[str, torch.Tensor]


@dataclass
class ShardMerge:
    """One shard's merge: the decoded merged vector (None: nothing usable, keep the shard),
    its new ref norm, and who was kept or excluded (index into the items, reason)."""

    merged: torch.Tensor | None
    ref: float | None
    kept: list[int] = field(default_factory=list)
    excluded: list[tuple[int, str]] = field(default_factory=list)


def merge_shard(items: Sequence[tuple[int, torch.Tensor | None]], n: int, prev_ref: float | None,
                p: MergeParams, out_codec: Codec) -> ShardMerge:
    """Screen and robustly merge (samples, decoded shard vector or None) items of length n."""
    sc = screen([(s, None if v is None else {"v": v}) for s, v in items], {"v": (n,)})
    if not sc.kept:
        return ShardMerge(None, prev_ref, [], sc.excluded)
    merged, ref = robust_merge([(s, d) for _, s, d in sc.kept], prev_ref, p)
    return ShardMerge(roundtrip(merged["v"], out_codec), ref, [i for i, _, _ in sc.kept], sc.excluded)


def zero_momentum(theta: Mapping[str, torch.Tensor]) -> Tensors:
    """An all-zero momentum like `theta` (the outer step's round-0 momentum, updatable in place)."""
    return {n: torch.zeros_like(t, dtype=torch.float32) for n, t in theta.items()}


def apply_shard(theta: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor],
                rng: tuple[int, int], merged: torch.Tensor, p: MergeParams) -> None:
    """The outer Nesterov step on one shard's range of (theta, momentum), in place."""
    a, b = rng
    if merged.numel() != b - a:
        raise ValueError(f"merged shard has {merged.numel()} values, range [{a}, {b}) needs {b - a}")
    th, mo = nesterov_step({"v": take(theta, a, b)}, {"v": merged}, {"v": take(momentum, a, b)},
                           lr=p.outer_lr, momentum_coef=p.outer_momentum)
    put(theta, a, th["v"])
    put(momentum, a, mo["v"])


def apply_update(theta: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor],
                 lay: ShardLayout, merged: Sequence[torch.Tensor | None], p: MergeParams) -> None:
    """Apply a round's merged update (one vector or None per shard) in place."""
    if len(merged) != len(lay):
        raise ValueError(f"{len(merged)} merged shards for a layout of {len(lay)}")
    for rng, vec in zip(lay, merged):
        if vec is not None:
            apply_shard(theta, momentum, rng, vec, p)


def catch_up(theta: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor] | None,
             lay: ShardLayout, updates: Sequence[Sequence[torch.Tensor | None]],
             p: MergeParams) -> tuple[Tensors, Tensors]:
    """A checkpoint's (theta, momentum) advanced by the merged updates since, in round order."""
    th = {n: t.detach().to("cpu", torch.float32).clone() for n, t in theta.items()}
    mo = zero_momentum(th) if momentum is None else {n: t.detach().to("cpu", torch.float32).clone()
                                                      for n, t in momentum.items()}
    for upd in updates:
        apply_update(th, mo, lay, upd, p)
    return th, mo

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

import math

import torch

from resbm.outer import _global_norm, nesterov_step
from resbm.robust_merge import MergeParams, capped_weights, lower_median, screen
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


COLUMNS = 1 << 20  # values (over all replicas) sorted at once: bounds the sort's working memory


def merge_shard(items: Sequence[tuple[int, torch.Tensor | None]], n: int, prev_ref: float | None,
                p: MergeParams, out_codec: Codec) -> ShardMerge:
    """Screen and robustly merge (samples, decoded shard vector or None) items of length n.

    Same rules and arithmetic as resbm.robust_merge.robust_merge on a one-tensor dict, but the
    per-coordinate part runs over column chunks, so the sort never holds more than COLUMNS
    values (plus their int64 indices) beside the items."""
    sc = screen([(s, None if v is None else {"v": v}) for s, v in items], {"v": (n,)})
    if not sc.kept:
        return ShardMerge(None, prev_ref, [], sc.excluded)
    vecs = [d["v"] for _, _, d in sc.kept]
    r = len(vecs)
    norms = [_global_norm({"v": v}) for v in vecs]
    ref = lower_median(norms)
    if prev_ref is not None and math.isfinite(prev_ref) and prev_ref > 0:
        ref = max(ref, float(torch.tensor(p.ref_floor * prev_ref, dtype=torch.float32)))
    bound = (p.clip_factor if r >= 3 else 1.0) * ref
    for j, nrm in enumerate(norms):
        if nrm > bound and nrm > 0:
            vecs[j] = vecs[j] * torch.tensor(bound / nrm, dtype=torch.float32)
    dev = vecs[0].device  # the merge runs where the pieces are (a GPU: neurons/sync_device.py)
    out = torch.empty(n, dtype=torch.float32, device=dev)
    cols = max(1, COLUMNS // r)
    if r >= 3:
        trim = min(max(1, int(math.floor(r * p.trim_fraction))), (r - 1) // 2)
        keep = r - 2 * trim
        # on the device: a CPU scalar divisor makes CUDA multiply by its reciprocal (other bits)
        k_t = torch.tensor(float(keep), dtype=torch.float32, device=dev)
        for a in range(0, n, cols):
            ordered = torch.sort(torch.stack([v[a:a + cols] for v in vecs]), dim=0).values
            acc = ordered[trim].clone()
            for j in range(trim + 1, trim + keep):
                acc = acc + ordered[j]
            out[a:a + cols] = acc / k_t
    else:
        weights = capped_weights([s for _, s, _ in sc.kept])
        total = sum(weights)
        ws = [torch.tensor(w / total, dtype=torch.float32) for w in weights]
        for a in range(0, n, cols):
            acc = torch.zeros(min(cols, n - a), dtype=torch.float32, device=dev)
            for v, w in zip(vecs, ws):
                acc = acc + v[a:a + cols] * w
            out[a:a + cols] = acc
    return ShardMerge(roundtrip(out, out_codec), float(ref), [i for i, _, _ in sc.kept], sc.excluded)


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

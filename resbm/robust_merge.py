"""The outer round's robust merge: which pseudo-gradients count, how much, and the outer step.

Rules (docs/SECURITY.md explains why each holds against one cheating replica):

* screening: an item that is not finite, has other names or shapes than the stage, or covers
  zero verified samples is excluded (and named, so its sender can be charged); it never blocks
  the merge; in the whole-state merge an all-zero item is left out too when another item moves
  (verified work that produced no update only dilutes the others);
* weights: the bridge's verified sample counts, each capped at the lower median of the counts,
  so no replica weighs more than the median one (with 2 replicas: equal weights);
* clipping: each replica is scaled down to `clip_factor x ref`, where `ref` is the lower median
  of this round's non-zero global norms (an attacker alone cannot raise it above an honest norm,
  nor set it to zero by sending nothing), floored
  at `ref_floor x` the previous round's `ref` (an attacker alone cannot shrink it to nothing);
  with 2 or fewer replicas the factor is 1, so a liar can at most cancel, never reverse;
* aggregation: with 3 or more replicas a per-coordinate trimmed mean (drop the `trim` largest
  and smallest, trim = max(1, floor(R x trim_fraction))); below 3 the weighted mean.

Arithmetic follows resbm.outer's rules (fp32, CPU, sorted names, element-wise ops, float64
norms rounded to fp32), so every replica and every validator gets bit-identical results.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from resbm.outer import OuterError, _global_norm, nesterov_step

__all__ = ["ZERO_UPDATE", "MergeParams", "Screened", "lower_median", "capped_weights", "screen",
           "robust_merge", "outer_round"]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MergeParams:
    """The run's merge knobs (from RunConfig)."""

    clip_factor: float = 2.0
    trim_fraction: float = 0.25
    ref_floor: float = 0.5
    outer_lr: float = 0.7
    outer_momentum: float = 0.9


@dataclass
class Screened:
    """Items that enter the merge (index into the input, samples, tensors) and those excluded."""

    kept: list[tuple[int, int, Tensors]]
    excluded: list[tuple[int, str]]


def lower_median(xs: Sequence[float]) -> float:
    """The lower of the two middle values (the middle one for an odd count)."""
    if not xs:
        raise OuterError("lower_median of nothing")
    s = sorted(xs)
    return float(s[(len(s) - 1) // 2])


def capped_weights(samples: Sequence[int]) -> list[float]:
    """Verified sample counts, each capped at the lower median count."""
    cap = lower_median([float(s) for s in samples])
    return [float(min(s, cap)) for s in samples]


ZERO_UPDATE = "no update: an all-zero pseudo-gradient"


def screen(items: Sequence[tuple[int, Mapping[str, torch.Tensor] | None]],
           shapes: Mapping[str, Sequence[int]], drop_zero: bool = False) -> Screened:
    """Split (samples, tensors or None for undecodable) into kept and excluded-with-reason.

    With `drop_zero`, an all-zero item is excluded when some other item moves: a replica whose
    verified backwards left no update (it took no steps) would otherwise dilute the others."""
    kept, excluded = [], []
    for i, (samples, tensors) in enumerate(items):
        reason = _problem(samples, tensors, shapes)
        if reason:
            excluded.append((i, reason))
        else:
            kept.append((i, int(samples), {n: tensors[n].detach().to(dtype=torch.float32).contiguous()
                                           for n in sorted(shapes)}))  # on the device they came on
    if drop_zero:
        zero = {i for i, _, d in kept if not any(bool(t.any()) for t in d.values())}
        if len(zero) < len(kept):
            kept = [k for k in kept if k[0] not in zero]
            excluded = sorted(excluded + [(i, ZERO_UPDATE) for i in zero])
    return Screened(kept, excluded)


def _problem(samples: object, tensors: Mapping[str, torch.Tensor] | None,
             shapes: Mapping[str, Sequence[int]]) -> str:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        return "no verified samples"
    if tensors is None:
        return "undecodable"
    if set(tensors) != set(shapes):
        return "wrong parameter names"
    for n, shape in shapes.items():
        t = tensors[n]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return f"{n}: not a floating-point tensor"
        if tuple(t.shape) != tuple(shape):
            return f"{n}: shape {tuple(t.shape)}, expected {tuple(shape)}"
        if not bool(torch.isfinite(t).all()):
            return f"{n}: not finite"
    return ""


def robust_merge(kept: Sequence[tuple[int, Tensors]], prev_ref: float | None,
                 p: MergeParams) -> tuple[Tensors, float]:
    """Merge screened (samples, tensors) items; returns (merged, this round's ref norm)."""
    if not kept:
        raise OuterError("robust_merge needs at least one item")
    r = len(kept)
    norms = [_global_norm(d) for _, d in kept]
    moving = [n for n in norms if n > 0]  # an all-zero item (no steps taken) must not set the bound
    ref = lower_median(moving) if moving else 0.0
    if prev_ref is not None and math.isfinite(prev_ref) and prev_ref > 0:
        ref = max(ref, float(torch.tensor(p.ref_floor * prev_ref, dtype=torch.float32)))
    bound = (p.clip_factor if r >= 3 else 1.0) * ref
    clipped = []
    for (_, d), nrm in zip(kept, norms):
        if nrm > bound and nrm > 0:
            s = torch.tensor(bound / nrm, dtype=torch.float32)
            d = {n: t * s for n, t in d.items()}
        clipped.append(d)
    names = sorted(clipped[0])
    out: Tensors = {}
    if r >= 3:
        trim = max(1, int(math.floor(r * p.trim_fraction)))
        trim = min(trim, (r - 1) // 2)
        keep = r - 2 * trim
        for n in names:
            ordered = torch.sort(torch.stack([d[n] for d in clipped]), dim=0).values
            acc = ordered[trim].clone()
            for j in range(trim + 1, trim + keep):
                acc = acc + ordered[j]
            out[n] = acc / torch.tensor(float(keep), dtype=torch.float32, device=acc.device)
        return out, float(ref)
    weights = capped_weights([s for s, _ in kept])
    total = sum(weights)
    for n in names:
        acc = torch.zeros_like(clipped[0][n])
        for d, w in zip(clipped, weights):
            acc = acc + d[n] * torch.tensor(w / total, dtype=torch.float32)
        out[n] = acc
    return out, float(ref)


def outer_round(theta: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor] | None,
                prev_ref: float | None, kept: Sequence[tuple[int, Tensors]],
                p: MergeParams) -> tuple[Tensors, Tensors | None, float | None]:
    """One outer step from screened items: (theta', momentum', ref'). No items: unchanged."""
    if not kept:
        return dict(theta), (dict(momentum) if momentum is not None else None), prev_ref
    merged, ref = robust_merge(kept, prev_ref, p)
    theta2, mom2 = nesterov_step(theta, merged, momentum, lr=p.outer_lr, momentum_coef=p.outer_momentum)
    return theta2, mom2, ref

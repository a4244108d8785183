"""Split the blocks over the stages by measured stage time, so no stage waits on another. Pure.

A stage's compute per sample is modelled as `per_layer x layers + overhead`: every block costs the
same (`per_layer`, taken from the stage with the least time per block), and what a stage spends
beyond its blocks (the embedding, the LM head, the boundary's encode and decode, a slower device)
is its `overhead`, which does not move with the blocks. The new split gives each next block to the
stage that would then be least loaded, which minimises the slowest stage's predicted time under
that model. Measure again after a change: the split converges when the model was off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Balance", "balance_layers", "balance_from_runs", "imbalance"]


@dataclass(frozen=True)
class Balance:
    """A suggested split and what the model predicts for it."""

    layers: tuple[int, ...]          # blocks per stage
    predicted: tuple[float, ...]     # seconds per sample per stage under the new split
    per_layer: float                 # seconds per block per sample
    overhead: tuple[float, ...]      # seconds per sample per stage beyond its blocks
    before: float                    # imbalance of the measured split (see `imbalance`)
    after: float                     # predicted imbalance of the new split


def imbalance(seconds: Sequence[float]) -> float:
    """How long the fastest stage waits on the slowest, as a share of the slowest's time."""
    return 1.0 - min(seconds) / max(seconds) if max(seconds) > 0 else 0.0


def _check(layers: Sequence[int], seconds: Sequence[float]) -> None:
    if len(layers) != len(seconds) or len(layers) < 1:
        raise ValueError(f"one measured time per stage: {len(layers)} stages, {len(seconds)} times")
    if any(int(n) != n or n < 1 for n in layers):
        raise ValueError(f"every stage needs at least one whole block, got {tuple(layers)}")
    if any(not math.isfinite(t) or t <= 0 for t in seconds):
        raise ValueError(f"stage times must be positive and finite, got {tuple(seconds)}")


def _split(total: int, per_layer: Sequence[float], overhead: Sequence[float]) -> list[int]:
    """Each block after the first of every stage goes where the stage would then be least loaded."""
    new = [1] * len(per_layer)
    for _ in range(total - len(new)):
        s = min(range(len(new)), key=lambda i: (overhead[i] + per_layer[i] * (new[i] + 1), i))
        new[s] += 1
    return new


def balance_layers(layers: Sequence[int], seconds: Sequence[float]) -> Balance:
    """The split of `sum(layers)` blocks over the stages that balances their measured `seconds`
    (compute per sample of each stage under the split `layers`)."""
    _check(layers, seconds)
    per_layer = min(t / n for t, n in zip(seconds, layers))
    overhead = tuple(t - per_layer * n for t, n in zip(seconds, layers))
    new = _split(sum(layers), [per_layer] * len(layers), overhead)
    predicted = tuple(o + per_layer * n for o, n in zip(overhead, new))
    return Balance(layers=tuple(new), predicted=predicted, per_layer=per_layer, overhead=overhead,
                   before=imbalance(seconds), after=imbalance(predicted))


def balance_from_runs(runs: Sequence[tuple[Sequence[int], Sequence[float]]]) -> Balance:
    """Like `balance_layers`, from several measured splits of the same blocks: where a stage was
    measured at two or more block counts, its own line (seconds = overhead + per block x blocks,
    least squares) replaces the one-measurement model, so a block's cost may differ by stage
    (its replicas' devices, what its hops recompute). `before` is the last run's imbalance."""
    if not runs:
        raise ValueError("no measured runs")
    for layers, seconds in runs:
        _check(layers, seconds)
    n_st, total = len(runs[-1][0]), sum(runs[-1][0])
    if any(len(l) != n_st or sum(l) != total for l, _ in runs):
        raise ValueError("every run must split the same number of blocks over the same stages")
    base = balance_layers(*runs[-1])
    slopes, offsets = [base.per_layer] * n_st, list(base.overhead)
    for s in range(n_st):
        pts = sorted({(l[s], t[s]) for l, t in runs})
        xs = [x for x, _ in pts]
        if len(set(xs)) < 2:
            continue
        mx, my = sum(xs) / len(pts), sum(y for _, y in pts) / len(pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
        slopes[s] = max(slope, 1e-9)  # more blocks never make a stage faster
        offsets[s] = my - slopes[s] * mx
    new = _split(total, slopes, offsets)
    predicted = tuple(o + c * n for o, c, n in zip(offsets, slopes, new))
    return Balance(layers=tuple(new), predicted=predicted, per_layer=min(slopes), overhead=tuple(offsets),
                   before=base.before, after=imbalance(predicted))

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

__all__ = ["Balance", "balance_layers", "imbalance"]


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


def balance_layers(layers: Sequence[int], seconds: Sequence[float]) -> Balance:
    """The split of `sum(layers)` blocks over the stages that balances their measured `seconds`
    (compute per sample of each stage under the split `layers`)."""
    if len(layers) != len(seconds) or len(layers) < 1:
        raise ValueError(f"one measured time per stage: {len(layers)} stages, {len(seconds)} times")
    if any(int(n) != n or n < 1 for n in layers):
        raise ValueError(f"every stage needs at least one whole block, got {tuple(layers)}")
    if any(not math.isfinite(t) or t <= 0 for t in seconds):
        raise ValueError(f"stage times must be positive and finite, got {tuple(seconds)}")
    per_layer = min(t / n for t, n in zip(seconds, layers))
    overhead = tuple(t - per_layer * n for t, n in zip(seconds, layers))
    new = [1] * len(layers)
    for _ in range(sum(layers) - len(layers)):
        s = min(range(len(new)), key=lambda i: (overhead[i] + per_layer * (new[i] + 1), i))
        new[s] += 1
    predicted = tuple(o + per_layer * n for o, n in zip(overhead, new))
    return Balance(layers=tuple(new), predicted=predicted, per_layer=per_layer, overhead=overhead,
                   before=imbalance(seconds), after=imbalance(predicted))

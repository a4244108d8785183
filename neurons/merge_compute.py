"""The merge as both a replica and a validator compute it: screen the frozen merge set's items
(fetched with neurons.objects), run the robust outer step, serialise the result.

Outcomes that are properties of the objects (a hash mismatch, bytes that do not decode, NaN,
wrong shapes, zero verified samples) exclude the item the same way everywhere, so every honest
replica and every validator reach the same state. A failed download is not such a property: it
raises `TransferError`, and the caller retries or abstains instead of computing a different merge.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from protocol.messages import MergeItem, RunConfig
from resbm import outer
from resbm.robust_merge import MergeParams, outer_round, screen

__all__ = ["MergeOutcome", "merge_params", "compute_merge"]

Tensors = dict[str, torch.Tensor]


@dataclass
class MergeOutcome:
    """The state a round's merge leads to, its bytes and sha256, and the items left out."""

    theta: Tensors
    momentum: Tensors | None
    ref_norm: float | None
    blob: bytes
    sha: str
    merged_from: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # hotkey -> reason


def merge_params(run: RunConfig) -> MergeParams:
    """The run's merge knobs."""
    return MergeParams(clip_factor=run.clip_factor, trim_fraction=run.trim_fraction,
                       ref_floor=run.ref_floor, outer_lr=run.outer_lr,
                       outer_momentum=run.outer_momentum)


def compute_merge(theta: Tensors, momentum: Tensors | None, ref_norm: float | None,
                  items: list[MergeItem], fetched: list[tuple[int, Tensors | None, str]],
                  shapes: dict, run: RunConfig) -> MergeOutcome:
    """The state after the round's outer step (deterministic: bit-identical everywhere)."""
    sc = screen([(s, t) for s, t, _ in fetched], shapes, drop_zero=True)
    excluded = {}
    for i, reason in sc.excluded:
        excluded[items[i].hotkey] = fetched[i][2] or reason
    kept = [(s, d) for _, s, d in sc.kept]
    theta2, mom2, ref2 = outer_round(theta, momentum, ref_norm, kept, merge_params(run))
    blob = outer.state_bytes(theta2, mom2, ref2)
    return MergeOutcome(theta2, mom2, ref2, blob, hashlib.sha256(blob).hexdigest(),
                        merged_from=[items[i].hotkey for i, _, _ in sc.kept], excluded=excluded)

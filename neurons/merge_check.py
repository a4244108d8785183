"""The validator's check of a round's merge: recompute it from the frozen set and judge votes.

The merge is deterministic (resbm.robust_merge), so the validator downloads the stage's start
state and the frozen pseudo-gradients, runs the same `compute_merge` as the replicas, and
compares the sha256 it gets with every vote. Only a voter whose hash differs from the
recomputation is failed, and a sender whose pseudo-gradient had to be left out for a property of
the object itself (hash mismatch, undecodable, NaN, wrong shapes). The same recomputation
settles the bridge's disputes (`arbitration_sha`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from protocol.messages import MergeItem, RunConfig, StateRef
from neurons.merge_compute import MergeOutcome, compute_merge
from neurons.objects import fetch_items, fetch_state
from neurons.stage_worker import worker_for_run
from neurons.transfer import ObjectTransfer
from resbm.robust_merge import ZERO_UPDATE

__all__ = ["MergeVerdicts", "recompute_stage", "judge_merge"]

log = logging.getLogger("validator")

_NOT_THE_SENDERS_FAULT = ("no verified samples", ZERO_UPDATE)  # the replay audit judges a lazy one


@dataclass
class MergeVerdicts:
    """What a recomputation says: the state it reached, and who failed with which reason."""

    sha: str
    failed: dict[str, str] = field(default_factory=dict)
    agreed: list[str] = field(default_factory=list)


def recompute_stage(transfer: ObjectTransfer, run: RunConfig, stage: int, start: StateRef | None,
                    items: list[MergeItem]) -> MergeOutcome:
    """The state a stage's round must have led to (raises TransferError when objects are gone)."""
    worker = worker_for_run(run, stage, "cpu")
    shapes = worker.param_shapes
    if start is None:
        theta, momentum, ref = worker.theta(), None, None
    else:
        theta, momentum, ref = fetch_state(transfer, start, shapes, run.max_state_bytes)
    fetched = fetch_items(transfer, items, shapes, run.max_state_bytes)
    return compute_merge(theta, momentum, ref, items, fetched, shapes, run)


def judge_merge(outcome: MergeOutcome, votes: dict[str, str]) -> MergeVerdicts:
    """Fail voters whose hash differs from the recomputation and senders of unusable items."""
    v = MergeVerdicts(sha=outcome.sha)
    for hk, why in outcome.excluded.items():
        if not why.startswith(_NOT_THE_SENDERS_FAULT):
            v.failed[hk] = f"pseudo-gradient unusable: {why}"
    for hk, sha in sorted(votes.items()):
        if sha == outcome.sha:
            v.agreed.append(hk)
        elif hk not in v.failed:
            v.failed[hk] = f"merged state {sha[:12]} differs from the recomputation {outcome.sha[:12]}"
    return v

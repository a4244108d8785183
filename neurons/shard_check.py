"""The validator's check of a sharded round: recompute a shard's merge and judge its votes.

A shard's merge is deterministic (resbm.shard_merge over pieces verified by sha256), so a
validator downloads the frozen pieces of that shard, runs the same `ReplicaSync.merge_one` as the
mergers without uploading, and compares the sha256 it gets with each merger's vote, exactly as
neurons.merge_check does for a whole state: only a voter that differs from the recomputation is
failed, and a sender whose piece was unusable for a property of the object itself. The same
recomputation settles a disputed shard (bridge.shard_votes.arbitrate). Checking one random shard
per round per stage costs 1/S of a full recomputation; any lie on a shard is caught with
probability 1/S per round, and every lie a majority did not outvote is caught by a dispute.
"""
from __future__ import annotations

from collections.abc import Sequence

from neurons.merge_check import MergeVerdicts, judge_merge
from neurons.shard_sync import MergedShard, Piece, ReplicaSync

__all__ = ["recompute_shard", "judge_shard"]


def recompute_shard(sync: ReplicaSync, rnd: int, shard: int, rng: tuple[int, int],
                    pieces: Sequence[Piece], prev_ref: float | None) -> MergedShard:
    """The merged shard the frozen pieces must lead to (raises TransferError when objects are gone)."""
    return sync.merge_one(rnd, shard, rng, pieces, prev_ref, upload=False)


def judge_shard(outcome: MergedShard, votes: dict[str, str]) -> MergeVerdicts:
    """Fail mergers whose vote differs from the recomputation and senders of unusable pieces."""
    return judge_merge(outcome, votes)  # type: ignore[arg-type]  # needs only .sha and .excluded

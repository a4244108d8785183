"""The round-end sync a run uses, chosen once from its config, and who merges what.

There is one sync: each replica's pseudo-gradient goes up in shards, each shard is merged by its
assigned mergers and voted shard by shard, every replica applies the decided update, and every
K-th round the replicas vote the full state (a checkpoint) that joiners start from. `sync_mode`
only picks its settings:

- `sharded`: the run's `sync_shards`, `sync_mergers`, codecs, block and `checkpoint_every`;
- `state` (the whole-state merge): one shard, every replica of the merge set a merger, fp32
  both ways, and the full state voted and published every round.

`sync_plan(run)` is the only reader of `sync_mode`; the bridge, the miners and the validators all
act on the plan. `assign_mergers` is the pure merger table every party computes alike.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.run_config import RunConfig

__all__ = ["SyncPlan", "sync_plan", "ignored_settings", "checkpoint_due", "assign_mergers", "shards_of"]

WHOLE_STATE_MERGERS = 4096  # more than any merge set: every replica of the set merges the one shard


@dataclass(frozen=True)
class SyncPlan:
    """How a run syncs its replicas at a round's end."""

    shards: int
    mergers: int            # per shard (capped by the merge set's size)
    pg_codec: str           # resbm.sync_codec name of a pseudo-gradient piece
    merged_codec: str       # ... of a merged update
    block: int              # values per codec block
    checkpoint_every: int   # K: the full state is voted every K-th round (and in the last)
    total_rounds: int

    def checkpoint_due(self, round_: int) -> bool:
        """Whether round `round_` ends with a full checkpoint vote."""
        return checkpoint_due(round_, self.checkpoint_every, self.total_rounds)


def sync_plan(run: RunConfig) -> SyncPlan:
    """The run's sync settings (see the module docstring)."""
    if run.sync_mode == "state":
        return SyncPlan(1, WHOLE_STATE_MERGERS, "fp32", "fp32", run.sync_block, 1, run.total_rounds)
    return SyncPlan(run.sync_shards, run.sync_mergers, run.sync_codec, run.sync_merged_codec, run.sync_block,
                    run.checkpoint_every, run.total_rounds)


def ignored_settings(run: RunConfig) -> list[str]:
    """The sync fields the run sets but its `sync_mode` overrides (for a start-up warning)."""
    plan, given = sync_plan(run), (run.sync_shards, run.sync_codec, run.sync_merged_codec, run.checkpoint_every)
    used = (plan.shards, plan.pg_codec, plan.merged_codec, plan.checkpoint_every)
    names = ("sync_shards", "sync_codec", "sync_merged_codec", "checkpoint_every")
    return [n for n, g, u in zip(names, given, used) if g != u]


def checkpoint_due(round_: int, checkpoint_every: int, total_rounds: int) -> bool:
    """Whether round `round_` ends with a full checkpoint: every K-th round, and the run's last."""
    return (round_ + 1) % checkpoint_every == 0 or round_ + 1 == total_rounds


def _order(round_: int, stage: int, hotkeys: Sequence[str]) -> list[str]:
    def key(h: str) -> str:
        return hashlib.sha256(f"resbm-shards:{round_}:{stage}:{h}".encode()).hexdigest()
    return sorted(set(hotkeys), key=lambda h: (key(h), h))


def assign_mergers(round_: int, stage: int, hotkeys: Sequence[str], n_shards: int,
                   mergers: int) -> list[list[str]]:
    """For each shard, the replicas (hotkeys) that merge it this round; [] without replicas.

    A pure function of its arguments: every replica and the bridge compute the same table. Each
    shard is merged by min(mergers, R) distinct replicas taken round-robin from a per-round hash
    order, so a replica merges about shards x mergers / R shards whatever R is."""
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

"""A run's round-end sync, chosen once from its config: the one place in neurons that reads
`sync_mode`. Miners, validators and model readers act on the `RoundSync` it returns.

| duty | whole-state (`state`) | sharded |
|---|---|---|
| miner's round end: upload, merge, vote, apply (`merge` the class, `merge_for` the honest one on its device) | neurons.round_merge.ReplicaMerge | neurons.shard_round.ShardedMerge |
| (re)join: the state the round starts from (`load_state`) | the published state | checkpoint + decided updates |
| validator: recompute every merge of a round (`check_round`) | neurons.validator_integrity | neurons.shard_validate |
| validator: settle open disputes (`settle`) | neurons.validator_integrity | neurons.shard_validate |
| validator: an audit's inputs (`audit_inputs`) | none needed (the hop log has them) | the round's pieces |
| a published model's stage weights (`stage_weights`) | the voted state | checkpoint + updates replayed |

The implementations stay in their modules (their internals are tuned for speed elsewhere); this
module only binds them behind one interface.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from neurons import model_weights, round_merge, shard_round, shard_validate, validator_integrity
from neurons.round_merge import ReplicaMerge, RoundState
from protocol.messages import Assignment, HopLog, RunConfig

__all__ = ["RoundSync", "WholeStateSync", "ShardedSync", "sync_for"]


class RoundSync(Protocol):
    """What every party does with a run's round-end sync."""

    name: str
    merge: type[ReplicaMerge]

    def merge_for(self, client: Any, transfer: Any, worker: Any, run: RunConfig, stop: Any,
                  sync_device: Callable[[], Any]) -> ReplicaMerge:
        """The honest round end (`sync_device()`: where its arithmetic runs, picked once on demand)."""

    def load_state(self, worker: Any, a: Assignment, client: Any, transfer: Any, run: RunConfig,
                   computed: Optional[tuple], init: Optional[Callable[[], Any]]) -> RoundState:
        """The state the assigned round starts from (our own last merge when it is the one)."""

    def check_round(self, client: Any, transfer: Any, run: RunConfig, hoplog: HopLog,
                    starts: Callable[[], Any]) -> dict[str, str]:
        """{hotkey: reason} of every replica a recomputation of the round's merges fails
        (`starts()`: the validator's kept round starts, built on demand)."""

    def settle(self, client: Any, transfer: Any, run: RunConfig, settled: set) -> int:
        """Recompute every open dispute once and post the result; how many were settled."""

    def audit_inputs(self, client: Any, transfer: Any, run: RunConfig, rnd: int, hotkey: str,
                     starts: Callable[[], Any]) -> Any:
        """Extra inputs an audit of `hotkey` in round `rnd` needs (None: the hop log is enough)."""

    def stage_weights(self, getter: Any, pm: Any, st: Any, cfg: Any, shapes: dict) -> dict:
        """A published stage's verified weights."""


class WholeStateSync:
    """Every replica merges the whole pseudo-gradient set and votes the full state each round."""

    name = "state"
    merge = ReplicaMerge

    def merge_for(self, client, transfer, worker, run, stop, sync_device):
        """A whole-state merge (on the CPU: its bytes are what every voter hashes)."""
        return ReplicaMerge(client, transfer, worker, run, stop)

    def load_state(self, worker, a, client, transfer, run, computed, init):
        """The published state of the assigned round."""
        return round_merge.load_assigned_state(worker, a, transfer, run.max_state_bytes, computed, init)

    def check_round(self, client, transfer, run, hoplog, starts):
        """Recompute each stage's merge from the hop log's merge set and judge the votes."""
        return validator_integrity.check_round_merges(transfer, run, hoplog)

    def settle(self, client, transfer, run, settled):
        """Recompute each disputed stage's merge."""
        return validator_integrity.settle_disputes(client, transfer, run, settled)

    def audit_inputs(self, client, transfer, run, rnd, hotkey, starts):
        """None: the hop log names the whole pseudo-gradient."""
        return None

    def stage_weights(self, getter, pm, st, cfg, shapes):
        """The state the replicas voted for."""
        return model_weights.whole_state_weights(getter, pm, st, cfg, shapes)


class ShardedSync:
    """Pseudo-gradients go up in shards, each merged by a few replicas; checkpoints every K rounds."""

    name = "sharded"
    merge = shard_round.ShardedMerge

    def merge_for(self, client, transfer, worker, run, stop, sync_device):
        """A sharded round end whose arithmetic runs on the checked sync device."""
        m = shard_round.ShardedMerge(client, transfer, worker, run, stop)
        m.sync_device = sync_device()
        return m

    def load_state(self, worker, a, client, transfer, run, computed, init):
        """The last checkpoint plus every decided update since."""
        return shard_round.load_sharded_state(worker, a, client, transfer, run, computed, init or worker.theta)

    def check_round(self, client, transfer, run, hoplog, starts):
        """Recompute the round's shards and checkpoints from its sync views."""
        return shard_validate.check_sharded_round(client, transfer, run, hoplog, starts())

    def settle(self, client, transfer, run, settled):
        """Recompute each disputed shard or checkpoint."""
        return shard_validate.settle_sharded(client, transfer, run, settled)

    def audit_inputs(self, client, transfer, run, rnd, hotkey, starts):
        """The miner's pieces and its round start, from the round's sync view."""
        return shard_validate.audit_inputs(client, transfer, run, rnd, hotkey, starts())

    def stage_weights(self, getter, pm, st, cfg, shapes):
        """The checkpoint and the decided updates, replayed."""
        return model_weights.sharded_weights(getter, pm, st, cfg, shapes)


_SYNCS: dict[str, RoundSync] = {"state": WholeStateSync(), "sharded": ShardedSync()}


def sync_for(run: RunConfig) -> RoundSync:
    """The run's sync implementation (RunConfig validates `sync_mode`, so one always exists)."""
    return _SYNCS[run.sync_mode]

"""An honest replica that falls behind (a slow or stuck GPU, a long pause): in its merge of one round
it stops after the set froze and waits until the run has reached a later round, then carries on
with what the real miner does next. Used to check that a replica behind by more than the
bridge's kept updates catches up from the latest checkpoint and earns again."""
from __future__ import annotations

from neurons.miner_loop import Miner
from neurons.shard_round import ShardedMerge
from neurons.sync_follow import get_view
from protocol.client import BridgeError

__all__ = ["LaggardMiner"]


class _StallingMerge(ShardedMerge):
    """The honest sharded round, except that it stalls once the set of `stall` froze."""

    def __init__(self, *a, stall: int, resume: int, seen: list, **kw):
        super().__init__(*a, **kw)
        self.stall, self.resume, self.seen = stall, resume, seen

    def merged_shards(self, rnd, mine, sync):
        # the first round from `stall` on in which it merges (a loaded box may route it no work in
        # `stall` itself), for as many rounds as `resume - stall`
        if rnd < self.stall or self.seen:
            return mine
        self.seen.append(f"stalled in round {rnd}")
        back = rnd + self.resume - self.stall
        while not self.stop.is_set():
            m = self.client.metrics()
            if m.phase == "done" or m.round >= back + 1 or (m.round >= back and self._pruned(rnd)):
                break  # a round later when its round's updates are still kept (checkpoint parity)
            self.stop.wait(0.3)
        try:  # what the view of our round says now (the real flow asks it next)
            get_view(self.client, rnd, self.worker.stage_index)
            self.seen.append("kept")
        except BridgeError as exc:
            self.seen.append(exc.code)
        return {}  # too late to vote: the round was decided without us

    def _pruned(self, rnd: int) -> bool:
        try:
            get_view(self.client, rnd, self.worker.stage_index)
        except BridgeError as exc:
            return exc.code == "updates_pruned"
        return False


class LaggardMiner(Miner):
    """A Miner whose merge of round `stall` (or the first it merges after) stalls for `resume - stall` rounds."""

    def __init__(self, *a, stall: int, resume: int, **kw):
        super().__init__(*a, **kw)
        self.stall, self.resume, self.seen = stall, resume, []
        self.catch_ups: list[tuple] = []  # (round, (checkpoint round, updates replayed)) per catch-up

    def register(self):
        a = super().register()
        if self.state.caught_up is not None:
            self.catch_ups.append((a.round, self.state.caught_up))
        return a

    def _round_merge(self):
        return _StallingMerge(self.client, self.transfer, self.worker, self.run, self.stop,
                              stall=self.stall, resume=self.resume, seen=self.seen)

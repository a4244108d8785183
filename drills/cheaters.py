"""Cheating miners: subclasses of the honest `Miner`, one per adversary the validators and the
bridge must defeat (hop-level kinds from drills.hop_cheats, merge-level from drills.merge_cheats,
claim-level here)."""
from __future__ import annotations

import logging

from drills.hop_cheats import Cheat
from drills.merge_cheats import MERGE_CHEATS, merge_cheat
from drills.shard_cheats import sharded_cheat
from neurons.objects import BadInput
from neurons.miner_loop import Miner

__all__ = ["CHEATERS", "cheating_miner", "CheatingMiner"]

log = logging.getLogger("drills")

HOP_KINDS = ("random", "stale", "copy", "lazy", "phantom")
CLAIM_KINDS = ("false-claim", "bad-sha")
CHEATERS = tuple(sorted(set(HOP_KINDS) | set(MERGE_CHEATS) | set(CLAIM_KINDS)))
"""Every cheater kind a drill can run."""


class CheatingMiner(Miner):
    """A miner that deviates as `kind` says (see the module docstrings of drills.*)."""

    def __init__(self, *args, kind: str, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if kind not in CHEATERS:
            raise ValueError(f"unknown cheater {kind!r}; choose one of {', '.join(CHEATERS)}")
        self.kind = kind
        self.cheat = Cheat(kind if kind in HOP_KINDS else "honest", seed=seed)
        self._merge_kind = merge_cheat(kind)

    def _round_merge(self):
        cls = sharded_cheat(self.kind) if self.run.sync_mode == "sharded" else self._merge_kind
        return cls(self.client, self.transfer, self.worker, self.run, self.stop)

    def _compute(self, hop, inputs):
        out, loss = super()._compute(hop, inputs)
        if out is None:
            return out, loss
        if hop.kind == "fwd":
            return self.cheat.forward_output(out, hop), loss
        return self.cheat.input_grad(out, hop), loss

    def _put_output(self, hop, blob: bytes) -> None:
        if self.cheat.skip_upload(hop):
            return
        if self.kind == "bad-sha":  # upload other bytes than the sha256 reported at done
            blob = bytes(blob[:-1]) + bytes([blob[-1] ^ 1])
        super()._put_output(hop, blob)

    def _apply_step(self, global_step: int) -> None:
        if self.cheat.skip_step():
            self.worker.discard_gradients()
            return
        super()._apply_step(global_step)

    def _upload_and_report(self, hop, out, loss, seconds, *args, **kwargs):
        super()._upload_and_report(hop, out, loss, seconds, *args, **kwargs)
        if self.kind == "overwrite" and hop.output is not None:
            try:  # after done: try to change what the next stage and the validator will read
                self.transfer.put(hop.output.put_url, b"\0" * hop.output.size)
            except Exception as exc:  # refused is the desired outcome
                log.info("drill overwrite: hop output re-PUT refused (%s)", str(exc)[:120])

    def _work(self, hops):
        if self.kind == "false-claim":
            for hop in hops:
                if hop.act_in is not None or hop.grad_in is not None:
                    self._report_bad_input(hop, BadInput("bad_hash", "drill: a false claim"))
                else:
                    super()._work([hop])
            return
        super()._work(hops)


def cheating_miner(kind: str, *args, **kwargs) -> Miner:
    """A Miner for `kind` ('honest' gives the honest Miner)."""
    if kind == "honest":
        return Miner(*args, **kwargs)
    return CheatingMiner(*args, kind=kind, **kwargs)

"""Round boundaries for a miner: load the assigned state, and the outer step at a round's end.

At the end of round r a replica uploads its pseudo-gradient to its own staging key and reports
it (the bridge copies it to a final, write-once key and weighs it by the backwards it verified),
waits for the frozen merge set of its stage, computes the deterministic robust merge and
Nesterov outer step (neurons.merge_compute), uploads the resulting state the same way and reports
its hash; the bridge publishes round r+1 on a strict majority or a validator's recomputation.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass

import torch

from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.messages import (Assignment, MergedAck, MergedReport, MergeSet, PseudogradReport,
                               RunConfig, UploadRequest)
from resbm import outer
from neurons.merge_compute import MergeOutcome, compute_merge
from neurons.objects import fetch_items, fetch_state
from neurons.transfer import ObjectTransfer, TransferError

__all__ = ["RoundState", "load_assigned_state", "ReplicaMerge"]

log = logging.getLogger("miner")


@dataclass
class RoundState:
    """What a replica holds for the round it is in."""

    round: int
    theta_start: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None
    sha: str | None
    samples: int = 0
    ref_norm: float | None = None
    shard_refs: list | None = None  # the sharded sync's clip reference per shard
    caught_up: tuple | None = None  # (checkpoint round, updates replayed) when rebuilt from a checkpoint


def load_assigned_state(worker, a: Assignment, transfer: ObjectTransfer, max_bytes: int,
                        computed: tuple | None = None, init_theta=None) -> RoundState:
    """Load the state the bridge assigned, or the init-from-seed weights when the stage has
    published none yet (`init_theta()` rebuilds them; None: the worker holds them still).

    `computed` = (sha, theta, momentum, ref_norm) of a state this replica merged itself: used
    instead of a download when it is the published one."""
    if a.state is None:
        if init_theta is not None:  # a stage that kept its init state after a round of work
            worker.load_theta(init_theta())
        return RoundState(round=a.round, theta_start=worker.theta(), momentum=None, sha=None)
    if computed is not None and computed[0] == a.state.sha256:
        theta, momentum, ref = computed[1], computed[2], computed[3]
    else:
        theta, momentum, ref = fetch_state(transfer, a.state, worker.param_shapes, max_bytes)
    worker.load_theta(theta)
    return RoundState(round=a.round, theta_start=worker.theta(), momentum=momentum,
                      sha=a.state.sha256, ref_norm=ref)


class ReplicaMerge:
    """One replica's part in round `rnd`'s merge."""

    def __init__(self, client: BridgeClient, transfer: ObjectTransfer, worker, run: RunConfig,
                 stop: threading.Event):
        self.client, self.transfer, self.worker, self.run, self.stop = client, transfer, worker, run, stop

    # ----- what a replica contributes (drills override these) -----
    def pseudo_gradient(self, state: RoundState) -> dict[str, torch.Tensor]:
        """theta_start - theta_local."""
        return self.worker.pseudo_gradient(state.theta_start)

    def pseudo_gradient_bytes(self, pg: dict[str, torch.Tensor]) -> bytes:
        """The bytes uploaded for the pseudo-gradient."""
        return outer.tensors_bytes(pg)

    def merged_state(self, state: RoundState, mset: MergeSet, fetched: list) -> MergeOutcome:
        """The deterministic outer step over the frozen merge set."""
        return compute_merge(state.theta_start, state.momentum, state.ref_norm, mset.items, fetched,
                             self.worker.param_shapes, self.run)

    def vote(self, sha: str, blob: bytes) -> tuple[str, bytes]:
        """The (sha, state bytes) reported for the merged state."""
        return sha, blob

    def upload(self, rnd: int, kind: str, blob: bytes, sha: str | None = None) -> tuple[str, str]:
        """PUT `blob` to this replica's staging key; returns (key, sha reported)."""
        sha = sha or hashlib.sha256(blob).hexdigest()
        grant = self.client.upload(UploadRequest(round=rnd, kind=kind, sha256=sha, size=len(blob)))
        self.transfer.put(grant.put_url, blob)
        return grant.key, sha

    # ----- the protocol -----
    def _wait_merge_set(self, rnd: int, stage: int) -> MergeSet | None:
        """The frozen merge set; None when stopped or the round is over (it published without
        our vote: the published state comes with the next assignment)."""
        while not self.stop.is_set():
            try:
                return self.client.merge_set(rnd, stage)
            except BridgeError as exc:
                if exc.status != 409:
                    raise
                if exc.code != "not_frozen":
                    log.info("round %d: merge set not available (%s); loading the published state", rnd, exc.code)
                    return None
            self.stop.wait(0.2)
        return None

    def run_round(self, state: RoundState, rnd: int) -> tuple[RoundState, tuple | None]:
        """Do round `rnd`'s outer step; returns (state of round rnd+1, or the unchanged state if
        the round moved on without us, and (sha, theta, momentum, ref) of what we computed)."""
        stage, run = self.worker.stage_index, self.run
        pg = self.pseudo_gradient(state)
        blob = self.pseudo_gradient_bytes(pg)
        try:
            key, sha = self.upload(rnd, "pseudograd", blob)
            self.client.pseudograd(PseudogradReport(round=rnd, key=key, sha256=sha, size=len(blob)))
        except BridgeError as exc:
            if exc.status != 409:
                raise
            # no_work, frozen, not_merging, quarantined: nothing of ours is merged; wait for
            # the published state like a newcomer.
            log.info("round %d: pseudo-gradient not taken (%s); waiting for the published state",
                     rnd, exc.detail[:80])
            return state, None
        log.info("round %d: pseudo-gradient uploaded (%d samples here)", rnd, state.samples)
        mset = self._wait_merge_set(rnd, stage)
        if mset is None:
            return state, None
        shapes = self.worker.param_shapes
        try:
            fetched = fetch_items(self.transfer, mset.items, shapes, run.max_state_bytes)
        except TransferError as exc:  # not a property of the objects: abstain, never vote apart
            log.warning("round %d: merge set not readable (%s); not voting", rnd, exc)
            return state, None
        out = self.merged_state(state, mset, fetched)
        for hk, why in out.excluded.items():
            log.warning("round %d: pseudo-gradient of %s left out of the merge: %s", rnd, hk[:10], why)
        sha, blob = self.vote(out.sha, out.blob)
        key, sha = self.upload(rnd, "state", blob, sha)  # the bridge keys it under round rnd+1
        computed = (out.sha, out.theta, out.momentum, out.ref_norm)
        ack = self._report(rnd, sha, key)
        if ack is None or ack.state is None:
            return state, computed
        theta, momentum, ref = out.theta, out.momentum, out.ref_norm
        if ack.state.sha256 != out.sha:
            log.warning("round %d: my merged state %s.. differs from the published %s..; loading "
                        "the published one", rnd, out.sha[:10], ack.state.sha256[:10])
            theta, momentum, ref = fetch_state(self.transfer, ack.state, shapes, run.max_state_bytes)
        self.worker.load_theta(theta)
        log.info("round %d merged over %d replicas; round %d starts from %s..", rnd,
                 len(out.merged_from), rnd + 1, ack.state.sha256[:10])
        return RoundState(round=rnd + 1, theta_start=self.worker.theta(), momentum=momentum,
                          sha=ack.state.sha256, ref_norm=ref), computed

    def _report(self, rnd: int, sha: str, key: str) -> MergedAck | None:
        """Report the vote and wait until the stage is published (None: it moved on first)."""
        try:
            report = MergedReport(round=rnd, sha256=sha, key=key)
            ack = self.client.merged(report)
            while not ack.published and not self.stop.is_set():
                self.stop.wait(0.2)
                ack = self.client.merged(report)
        except BridgeError as exc:
            if exc.status != 409:
                raise
            return None  # the stage was published meanwhile: the caller re-registers to learn which
        return ack

"""Round boundaries for a miner: load the assigned state, and the outer step at a round's end.

At the end of round r a replica uploads its pseudo-gradient, waits for the frozen merge set of
its stage, computes the deterministic robust merge and Nesterov outer step (fp32, CPU, fixed
order), uploads the resulting state (content-addressed, so every agreeing replica writes the
same object) and reports its hash; the bridge publishes round r+1 once a majority agrees.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass

import torch

from protocol.client import BridgeError, SignedClient
from protocol.messages import (Assignment, MergedAck, MergedReport, MergeSet, PseudogradReport,
                               RunConfig, StateRef, UploadGrant, UploadRequest)
from resbm import outer
from neurons.transfer import HashMismatch, ObjectTransfer

__all__ = ["RoundState", "load_assigned_state", "merge_round", "fetch_state"]

log = logging.getLogger("miner")


@dataclass
class RoundState:
    """What a replica holds for the round it is in."""

    round: int
    theta_start: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None
    sha: str | None
    samples: int = 0


def fetch_state(transfer: ObjectTransfer, ref: StateRef, shapes: dict, max_bytes: int):
    """Download a published state, check its sha256, names, shapes and finiteness."""
    blob = transfer.get_verified(ref.url, ref.sha256, max_bytes, what=f"state {ref.key}")
    return outer.state_from_bytes(blob, expected=shapes, max_bytes=max_bytes)


def load_assigned_state(worker, a: Assignment, transfer: ObjectTransfer, max_bytes: int,
                        computed: tuple | None = None) -> RoundState:
    """Load the state the bridge assigned (or keep the init-from-seed weights for round 0).

    `computed` = (sha, theta, momentum) of a state this replica merged itself: used instead of a
    download when it is the published one."""
    if a.state is None:
        theta = worker.theta()
        return RoundState(round=a.round, theta_start=theta, momentum=None, sha=None)
    if computed is not None and computed[0] == a.state.sha256:
        theta, momentum = computed[1], computed[2]
    else:
        theta, momentum = fetch_state(transfer, a.state, worker.param_shapes, max_bytes)
    worker.load_theta(theta)
    return RoundState(round=a.round, theta_start=worker.theta(), momentum=momentum, sha=a.state.sha256)


def _upload(client: SignedClient, transfer: ObjectTransfer, rnd: int, kind: str, blob: bytes) -> tuple[str, str]:
    sha = hashlib.sha256(blob).hexdigest()
    grant = UploadGrant.model_validate(client.post(
        "/v1/rounds/upload", UploadRequest(round=rnd, kind=kind, sha256=sha, size=len(blob))))
    transfer.put(grant.put_url, blob)
    return grant.key, sha


def _wait_merge_set(client: SignedClient, rnd: int, stage: int, stop: threading.Event) -> MergeSet | None:
    while not stop.is_set():
        try:
            return MergeSet.model_validate(client.get(f"/v1/rounds/{rnd}/stages/{stage}/pseudograds"))
        except BridgeError as exc:
            if exc.status != 409:
                raise
        stop.wait(0.2)
    return None


def merge_round(client: SignedClient, transfer: ObjectTransfer, worker, state: RoundState, run: RunConfig,
                rnd: int, stop: threading.Event, cheat=None) -> tuple[RoundState, tuple | None]:
    """Do round `rnd`'s outer step for this replica; returns (state of round rnd+1, or the unchanged
    state if the round moved on without us, and (sha, theta, momentum) of what we computed)."""
    stage = worker.stage_index
    pg = worker.pseudo_gradient(state.theta_start)
    if cheat is not None:
        pg = cheat.pseudo_gradient(pg)
    try:
        key, sha = _upload(client, transfer, rnd, "pseudograd", outer.tensors_bytes(pg))
        client.post("/v1/rounds/pseudograd", PseudogradReport(round=rnd, key=key, sha256=sha,
                                                              size=len(outer.tensors_bytes(pg)), samples=state.samples))
    except BridgeError as exc:
        if exc.status != 409:
            raise
        # no_work (we did nothing this round), frozen (we are too late), not_merging (it moved on):
        # nothing of ours is merged; wait for the published state like a newcomer.
        log.info("round %d: pseudo-gradient not taken (%s); waiting for the published state", rnd, exc.detail[:80])
        return state, None
    log.info("round %d: pseudo-gradient uploaded (%d samples, norm %.4g)", rnd, state.samples,
             float(torch.sqrt(sum((t.double() ** 2).sum() for t in pg.values()))))
    mset = _wait_merge_set(client, rnd, stage, stop)
    if mset is None:
        return state, None
    shapes = worker.param_shapes
    items = []
    for it in mset.items:
        try:
            blob = transfer.get_verified(it.get_url, it.sha256, run.max_state_bytes, f"pseudo-gradient of {it.hotkey}")
        except HashMismatch as exc:  # every replica skips it alike, so the merge stays identical
            log.warning("%s; skipped", exc)
            continue
        items.append((it.samples, outer.tensors_from_bytes(blob, shapes, max_bytes=run.max_state_bytes)))
    # A replica that restarted late may report zero samples: its pseudo-gradient carries nothing.
    items = [it for it in items if it[0] > 0]
    if items:
        merged = outer.merge(items, method=run.merge_method, clip_factor=run.clip_factor)
    else:
        merged = {n: torch.zeros_like(t) for n, t in state.theta_start.items()}
    theta, momentum = outer.nesterov_step(state.theta_start, merged, state.momentum,
                                          lr=run.outer_lr, momentum_coef=run.outer_momentum)
    blob = outer.state_bytes(theta, momentum)
    key, sha = _upload(client, transfer, rnd, "state", blob)  # the bridge keys it under round rnd+1
    computed = (sha, theta, momentum)
    try:
        ack = MergedAck.model_validate(client.post("/v1/rounds/merged", MergedReport(round=rnd, sha256=sha, key=key)))
        while not ack.published and not stop.is_set():
            stop.wait(0.2)
            ack = MergedAck.model_validate(client.post("/v1/rounds/merged", MergedReport(round=rnd, sha256=sha, key=key)))
    except BridgeError as exc:
        if exc.status != 409:
            raise
        ack = None  # the stage was published meanwhile: the caller re-registers to learn which state won
    if ack is None or ack.state is None:
        return state, computed
    if ack.state.sha256 != sha:
        log.warning("round %d: my merged state %s.. disagrees with the published %s..; loading the published one",
                    rnd, sha[:10], ack.state.sha256[:10])
        theta, momentum = fetch_state(transfer, ack.state, shapes, run.max_state_bytes)
    worker.load_theta(theta)
    log.info("round %d merged over %d replicas; round %d starts from %s..", rnd, len(items), rnd + 1, ack.state.sha256[:10])
    return RoundState(round=rnd + 1, theta_start=worker.theta(), momentum=momentum, sha=ack.state.sha256), computed

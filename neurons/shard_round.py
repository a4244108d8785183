"""A miner's round end under the sharded sync (run config `sync_mode: sharded`).

1. Upload the pseudo-gradient shard by shard in the run's codec (staging grants), report the
   sha256s: the bridge seals each shard and enters the replica in the merge set.
2. Once the set is frozen, merge the shards the bridge's table assigns us (every replica's piece
   of that shard, verified), upload each merged update and vote its sha256.
3. Once every shard is decided, apply the outer step shard by shard from the decided updates
   (our own from memory, the rest downloaded). Only merged updates cross the wire.
4. Every `checkpoint_every`-th round, upload the full state (theta, momentum, clip references)
   and vote it through the whole-state vote; a strict majority publishes it for joiners.

A replica that was not in the merge set, restarted or joined late catches up from the last
checkpoint plus the decided updates since (`load_sharded_state`).
"""
from __future__ import annotations

import hashlib
import logging
import time

import torch

from protocol.client import BridgeError
from protocol.messages import Assignment
from protocol.routes import route
from protocol.keys import PieceKey, UpdateKey, parse_key
from protocol.sync_api import ShardVote, SyncPseudograd, SyncUpload, SyncVotes, checkpoint_due
from resbm.sync_state import checkpoint_bytes
from neurons.round_merge import ReplicaMerge, RoundState
from neurons.shard_sync import MergedShard, Piece, ReplicaSync, sync_settings
from neurons.sync_follow import get_view, start_of_round, state_sha, view_urls, wait_view

__all__ = ["BridgeBoard", "ShardedMerge", "load_sharded_state"]

log = logging.getLogger("miner")



class BridgeBoard:
    """Presigned URLs from the bridge: PUT grants to our staging keys, GETs from a view."""

    def __init__(self, client):
        self.client = client
        self.urls: dict[str, str] = {}

    def put_url(self, key: str, size: int) -> str:
        """A grant for the staging key of final `key` (one of ours)."""
        try:
            k = parse_key(key).key
        except KeyError as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(k, (PieceKey, UpdateKey)):
            raise ValueError(f"not a sync object key: {key[:120]}")
        kind = "pg" if isinstance(k, PieceKey) else "merged"
        grant = self.client.call(route("sync_upload"), SyncUpload(
            round=k.round, kind=kind, shard=k.shard, sha256=k.sha256, size=size))
        return grant.put_url

    def get_url(self, key: str) -> str:
        """The URL the last view gave for a final key."""
        try:
            return self.urls[key]
        except KeyError:
            raise ValueError(f"no URL known for {key[:120]}") from None

    def learn(self, view, run_id: str) -> None:
        """Remember the GET URLs of a view's pieces and decided updates."""
        self.urls.update(view_urls(view, run_id))


class ShardedMerge(ReplicaMerge):
    """One replica's part in a sharded round (drills override the hooks). Its arithmetic runs on
    `sync_device` (the miner's GPU when it reproduces the CPU's bits: neurons/sync_device.py)."""

    sync_device = torch.device("cpu")

    def pseudo_gradient(self, state: RoundState) -> dict:
        """theta_start - theta_local, on the sync device."""
        dev = self.sync_device
        if dev.type == "cpu":
            return super().pseudo_gradient(state)
        params = self.worker.module.state_dict()
        return {n: state.theta_start[n].to(dev) - params[n].detach().to(dev, torch.float32) for n in sorted(params)}

    def encode_piece(self, vec):
        """The bytes uploaded for one shard of the pseudo-gradient."""
        from resbm.sync_codec import encode
        return encode(vec, sync_settings(self.run).pg)

    def merged_shards(self, rnd: int, mine: dict[int, MergedShard], sync: ReplicaSync) -> dict[int, MergedShard]:
        """The merged shards voted for (honest: what we computed)."""
        return mine

    def _sync(self) -> tuple[ReplicaSync, BridgeBoard]:
        board = BridgeBoard(self.client)
        hotkey = self.client.keypair.ss58_address
        return ReplicaSync(self.transfer, board, sync_settings(self.run), self.run.run_id, hotkey,
                           self.worker.stage_index, encoder=self.encode_piece, device=self.sync_device), board

    def run_round(self, state: RoundState, rnd: int) -> tuple[RoundState, tuple | None]:
        stage, run, cfg = self.worker.stage_index, self.run, sync_settings(self.run)
        lay = cfg.layout(self.worker.param_shapes)
        if len(lay) != run.sync_shards:
            raise ValueError(f"sync_shards={run.sync_shards} is more than stage {stage}'s "
                             f"{lay.total} values allow ({len(lay)} shards of {run.sync_block}-value blocks): "
                             "lower sync_shards in the run config")
        sync, board = self._sync()
        dev = self.sync_device
        pg = {n: t.to(dev) for n, t in self.pseudo_gradient(state).items()}
        try:  # a grant is refused up front when the report would be (no_work, quarantined, frozen)
            sized = sync.upload_sized(rnd, pg, lay)
            del pg
            self.client.call(route("sync_pseudograd"), SyncPseudograd(
                round=rnd, shas=[s for s, _ in sized], sizes=[n for _, n in sized]))
        except BridgeError as exc:
            if exc.status != 409:
                raise
            log.info("round %d: pseudo-gradient not taken (%s); catching up later", rnd, exc.detail[:80])
            return state, None
        log.info("round %d: pseudo-gradient uploaded in %d shards (%d bytes)", rnd, len(sized),
                 sum(n for _, n in sized))
        view = wait_view(self.client, rnd, stage, lambda v: v.frozen and bool(v.mergers) or v.published, self.stop)
        if view is None or not view.mergers:
            return state, None
        board.learn(view, run.run_id)
        pieces = [Piece(p.hotkey, p.samples, tuple(p.shas)) for p in view.pieces]
        refs = state.shard_refs or [None] * len(lay)
        mine = self.merged_shards(rnd, sync.merge(rnd, view.mergers, lay, pieces, refs), sync)
        for s, ms in mine.items():
            for hk, why in ms.excluded.items():
                log.warning("round %d shard %d: piece of %s left out: %s", rnd, s, hk[:10], why)
        if mine:
            self.client.call(route("sync_votes"), SyncVotes(round=rnd, votes=[
                ShardVote(shard=s, sha256=ms.sha, size=ms.size) for s, ms in sorted(mine.items())]))
        view = wait_view(self.client, rnd, stage, lambda v: v.complete, self.stop)
        if view is None:
            return state, None
        board.learn(view, run.run_id)
        theta = {n: t.to(dev, copy=True) for n, t in state.theta_start.items()}
        momentum = state.momentum if state.momentum is not None else {n: t * 0 for n, t in theta.items()}
        momentum = {n: t.to(dev, copy=True) for n, t in momentum.items()}
        decided = [None if u is None else ([u.url, *u.alt_urls], u.sha256) for u in view.decided]
        new = sync.apply(rnd, theta, momentum, lay, decided, mine)
        refs = [n if n is not None else o for n, o in zip(new, refs)]
        sha = state.sha
        if checkpoint_due(rnd, run.checkpoint_every, run.total_rounds):
            sha = self._checkpoint(rnd, theta, momentum, refs, state.sha)
        self.worker.load_theta(theta)
        theta = self.worker.theta()  # the same values, on the CPU (the GPU's copies are freed)
        momentum = {n: t.cpu() for n, t in momentum.items()}
        kept = sum(1 for d in decided if d is None)
        log.info("round %d: %d shards applied (%d kept); round %d starts from %s..", rnd,
                 len(decided) - kept, kept, rnd + 1, state_sha(theta)[:10])
        return RoundState(round=rnd + 1, theta_start=theta, momentum=momentum, sha=sha,
                          shard_refs=refs), ("sharded", rnd + 1, theta, momentum, refs)

    def _checkpoint(self, rnd: int, theta, momentum, refs, prev: str | None) -> str | None:
        """Upload and vote the full state; returns the published checkpoint's sha256."""
        blob = checkpoint_bytes(theta, momentum, refs)
        sha = hashlib.sha256(blob).hexdigest()
        sha, blob = self.vote(sha, blob)
        key, sha = self.upload(rnd, "state", blob, sha)
        ack = self._report(rnd, sha, key)
        if ack is None or ack.state is None:
            return prev
        if ack.state.sha256 != sha:
            log.warning("round %d: checkpoint %s.. differs from the published %s..", rnd, sha[:10],
                        ack.state.sha256[:10])
        return ack.state.sha256


def load_sharded_state(worker, a: Assignment, client, transfer, run, computed: tuple | None,
                       init_theta) -> RoundState:
    """The state round `a.round` starts from: ours if we merged into it, else the last checkpoint
    plus the decided updates since (a joiner, a restart, or a replica the round went on without)."""
    caught_up = None
    if computed is not None and computed[0] == "sharded" and computed[1] == a.round:
        _, _, theta, momentum, refs = computed
    else:
        cfg = sync_settings(run)
        lay = cfg.layout(worker.param_shapes)
        view = _view_of(client, a.round, a.stage)
        st = start_of_round(transfer, view, worker.param_shapes, lay, cfg, run.max_state_bytes, init_theta)
        theta, momentum, refs = st.theta, st.momentum, st.refs
        caught_up = (view.checkpoint_round, len(view.updates))
        log.info("caught up to round %d from the checkpoint of round %d plus %d update(s)", a.round,
                 view.checkpoint_round, len(view.updates))
    worker.load_theta(theta)
    sha = a.state.sha256 if a.state is not None else None
    return RoundState(round=a.round, theta_start=worker.theta(), momentum=momentum, sha=sha, shard_refs=refs,
                      caught_up=caught_up)


def _view_of(client, rnd: int, stage: int):
    """The view of (rnd, stage); a round that ended while we asked is asked again (its archive)."""
    for attempt in range(10):
        try:
            return get_view(client, rnd, stage)
        except BridgeError as exc:
            if exc.code != "moved_on" or attempt == 9:
                raise
            time.sleep(0.2)

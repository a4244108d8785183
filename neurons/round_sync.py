"""A replica's round end: the one sync every run uses (a whole-state run is its one-shard case,
protocol/sync_plan.py), behind one interface the miner calls and drills override.

`RoundSync` does, in order (`run_round`):
1. `upload`: the pseudo-gradient goes up shard by shard in the run's codec (staging grants) and is
   reported (one sha256 per shard): the bridge seals each piece and enters the replica in the
   stage's merge set, weighed by the backwards it verified.
2. `merge`: once the set is frozen, the shards the bridge's table assigns us are merged (every
   replica's piece of that shard, verified, screened, robustly merged: neurons.shard_sync).
3. `vote`: each merged update is uploaded and its sha256 voted, shard by shard.
4. `apply`: once every shard is decided, the outer step is applied shard by shard from the decided
   updates (our own from memory, the rest downloaded).
5. `checkpoint`: every K-th round (every round for a whole-state run) the full state (theta,
   momentum, clip references) is uploaded and voted; the agreeing voters' copy is published.
`catch_up` rebuilds a round's start for a replica that was not in the set, restarted or joined:
the last checkpoint plus the decided updates since. The validator's side of the same sync is
neurons.sync_check.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from protocol.client import BridgeError
from protocol.keys import PieceKey, UpdateKey, parse_key
from protocol.messages import Assignment, MergedAck, MergedReport, UploadGrant, UploadRequest
from protocol.routes import route
from protocol.sync_api import ShardVote, SyncPseudograd, SyncUpload, SyncView, SyncVotes
from protocol.sync_plan import sync_plan
from resbm.shards import ShardLayout
from resbm.sync_codec import encode
from resbm.sync_state import checkpoint_bytes
from neurons.shard_sync import MergedShard, Piece, ReplicaSync, sync_settings
from neurons.sync_follow import get_view, start_of_round, state_sha, view_urls, wait_view

__all__ = ["RoundState", "Computed", "BridgeBoard", "RoundSync"]

log = logging.getLogger("miner")

Tensors = dict[str, torch.Tensor]


@dataclass
class RoundState:
    """What a replica holds for the round it is in."""

    round: int
    theta_start: Tensors
    momentum: Tensors | None
    sha: str | None                  # the published checkpoint it descends from (None: init)
    samples: int = 0
    shard_refs: list | None = None   # the clip reference per shard
    caught_up: tuple | None = None   # (checkpoint round, updates replayed) when rebuilt from a checkpoint


class Computed(NamedTuple):
    """The state a replica's own outer step reached: what round `round` starts from."""

    round: int
    theta: Tensors
    momentum: Tensors
    refs: list


class BridgeBoard:
    """Presigned URLs from the bridge: PUT grants to our staging keys, GETs from a view."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id
        self.urls: dict[str, str] = {}

    def put_url(self, key: str, size: int) -> str:
        """A grant for the staging key of final `key` (one of ours: a piece or a merged update)."""
        parsed = parse_key(key).key
        if isinstance(parsed, PieceKey):
            req = SyncUpload(round=parsed.round, kind="pg", shard=parsed.shard, sha256=parsed.sha256, size=size)
        elif isinstance(parsed, UpdateKey):
            req = SyncUpload(round=parsed.round, kind="merged", shard=parsed.shard, sha256=parsed.sha256, size=size)
        else:
            raise ValueError(f"not a sync object key: {key[:120]}")
        return self.client.call(route("sync_upload"), req).put_url

    def get_url(self, key: str) -> str:
        """The URL the last view gave for a final key."""
        try:
            return self.urls[key]
        except KeyError:
            raise ValueError(f"no URL known for {key[:120]}") from None

    def learn(self, view: SyncView) -> None:
        """Remember the GET URLs of a view's pieces and decided updates."""
        self.urls.update(view_urls(view, self.run_id))


class RoundSync:
    """One replica's sync of its stage (drills override the hooks: `pseudo_gradient`,
    `encode_piece`, `merged_shards`, `state_vote`, `state_grant`, `run_round`)."""

    def __init__(self, client: Any, transfer: Any, worker: Any, run: Any, stop: Any):
        self.client, self.transfer, self.worker, self.run, self.stop = client, transfer, worker, run, stop
        self.cfg = sync_settings(run)
        self.plan = sync_plan(run)
        self.board = BridgeBoard(client, run.run_id)
        self.sync = ReplicaSync(transfer, self.board, self.cfg, run.run_id, client.keypair.ss58_address,
                                worker.stage_index, encoder=self.encode_piece)

    # ----- what a replica contributes (drills override these) -----
    def pseudo_gradient(self, state: RoundState) -> Tensors:
        """theta_start - theta_local."""
        return self.worker.pseudo_gradient(state.theta_start)

    def encode_piece(self, vec: torch.Tensor) -> bytes:
        """The bytes uploaded for one shard of the pseudo-gradient."""
        return encode(vec, self.cfg.pg)

    def merged_shards(self, rnd: int, mine: dict[int, MergedShard]) -> dict[int, MergedShard]:
        """The merged shards voted for (honest: what we computed)."""
        return mine

    def state_vote(self, sha: str, blob: bytes) -> tuple[str, bytes]:
        """The (sha256, bytes) voted for a checkpoint's full state (honest: what we computed)."""
        return sha, blob

    def state_grant(self, rnd: int, sha: str, size: int) -> UploadGrant:
        """The bridge's PUT grant for a checkpoint's full state (our staging key)."""
        return self.client.upload(UploadRequest(round=rnd, kind="state", sha256=sha, size=size))

    # ----- the interface -----
    def layout(self) -> ShardLayout:
        """The stage's shard layout (ValueError, one line, when the stage has fewer values than shards)."""
        lay = self.cfg.layout(self.worker.param_shapes)
        if len(lay) != self.cfg.shards:
            raise ValueError(f"sync_shards={self.cfg.shards} is more than stage {self.worker.stage_index}'s "
                             f"{lay.total} values allow ({len(lay)} shards of {self.cfg.pg.block}-value blocks): "
                             "lower sync_shards in the run config")
        return lay

    def upload(self, state: RoundState, rnd: int) -> bool:
        """Upload and report the round's pseudo-gradient; False when the bridge does not take it
        (no_work, quarantined, frozen: the published state comes with catch-up)."""
        lay = self.layout()
        pg = self.pseudo_gradient(state)
        try:  # a grant is refused up front when the report would be
            sized = self.sync.upload_sized(rnd, pg, lay)
            del pg
            self.client.call(route("sync_pseudograd"), SyncPseudograd(
                round=rnd, shas=[s for s, _ in sized], sizes=[n for _, n in sized]))
        except BridgeError as exc:
            if exc.status != 409:
                raise
            log.info("round %d: pseudo-gradient not taken (%s); catching up later", rnd, exc.detail[:80])
            return False
        log.info("round %d: pseudo-gradient uploaded in %d shard(s) (%d bytes)", rnd, len(sized),
                 sum(n for _, n in sized))
        return True

    def merge(self, state: RoundState, rnd: int, view: SyncView) -> dict[int, MergedShard]:
        """Merge (and upload) the shards the frozen set's table gives us."""
        self.board.learn(view)
        pieces = [Piece(p.hotkey, p.samples, tuple(p.shas)) for p in view.pieces]
        lay = self.layout()
        refs = state.shard_refs or [None] * len(lay)
        mine = self.merged_shards(rnd, self.sync.merge(rnd, view.mergers, lay, pieces, refs))
        for s, ms in mine.items():
            for hk, why in ms.excluded.items():
                log.warning("round %d shard %d: piece of %s left out: %s", rnd, s, hk[:10], why)
        return mine

    def vote(self, rnd: int, mine: dict[int, MergedShard]) -> None:
        """Vote the sha256 of every merged update (uploaded by `merge`)."""
        if mine:
            self.client.call(route("sync_votes"), SyncVotes(round=rnd, votes=[
                ShardVote(shard=s, sha256=ms.sha, size=ms.size) for s, ms in sorted(mine.items())]))

    def apply(self, state: RoundState, rnd: int, view: SyncView,
              mine: dict[int, MergedShard]) -> Computed:
        """The outer step of the round's decided update, from the round's start."""
        self.board.learn(view)
        lay = self.layout()
        theta = {n: t.clone() for n, t in state.theta_start.items()}
        momentum = state.momentum if state.momentum is not None else {n: t * 0 for n, t in theta.items()}
        momentum = {n: t.clone() for n, t in momentum.items()}
        decided = [None if u is None else ([u.url, *u.alt_urls], u.sha256) for u in view.decided]
        new = self.sync.apply(rnd, theta, momentum, lay, decided, mine)
        old = state.shard_refs or [None] * len(lay)
        kept = sum(1 for d in decided if d is None)
        log.info("round %d: %d shard(s) applied (%d kept); round %d starts from %s..", rnd, len(decided) - kept, kept,
                 rnd + 1, state_sha(theta)[:10])
        return Computed(rnd + 1, theta, momentum, [n if n is not None else o for n, o in zip(new, old)])

    def checkpoint(self, rnd: int, after: Computed, prev: str | None) -> str | None:
        """Upload and vote the full state; returns the published checkpoint's sha256 (`prev` when
        the round moved on without a publication we saw)."""
        blob = checkpoint_bytes(after.theta, after.momentum, after.refs)
        sha, blob = self.state_vote(hashlib.sha256(blob).hexdigest(), blob)
        grant = self.state_grant(rnd, sha, len(blob))
        self.transfer.put(grant.put_url, blob)
        ack = self._report(rnd, sha, grant.key)
        if ack is None or ack.state is None:
            return prev
        if ack.state.sha256 != sha:
            log.warning("round %d: checkpoint %s.. differs from the published %s..", rnd, sha[:10],
                        ack.state.sha256[:10])
        return ack.state.sha256

    def catch_up(self, a: Assignment, computed: Optional[Computed], init_theta: Any) -> RoundState:
        """The state round `a.round` starts from: ours if we computed it, else the last checkpoint plus
        the decided updates since (a joiner, a restart, or a replica the round went on without)."""
        caught_up = None
        if computed is not None and computed.round == a.round:
            theta, momentum, refs = computed.theta, computed.momentum, computed.refs
        else:
            view = get_view(self.client, a.round, a.stage)
            st = start_of_round(self.transfer, view, self.worker.param_shapes, self.layout(), self.cfg,
                                self.run.max_state_bytes, init_theta)
            theta, momentum, refs = st.theta, st.momentum, st.refs
            caught_up = (view.checkpoint_round, len(view.updates))
            log.info("caught up to round %d from the checkpoint of round %d plus %d update(s)", a.round,
                     view.checkpoint_round, len(view.updates))
        self.worker.load_theta(theta)
        return RoundState(round=a.round, theta_start=self.worker.theta(), momentum=momentum,
                          sha=a.state.sha256 if a.state is not None else None, shard_refs=refs, caught_up=caught_up)

    def run_round(self, state: RoundState, rnd: int) -> tuple[RoundState, Optional[Computed]]:
        """Round `rnd`'s sync; returns (the state round rnd+1 starts from, or the unchanged state when
        the round moved on without us, and what we computed)."""
        if not self.upload(state, rnd):
            return state, None
        stage = self.worker.stage_index
        view = wait_view(self.client, rnd, stage, lambda v: v.frozen and bool(v.mergers) or v.published, self.stop)
        if view is None or not view.mergers:
            return state, None
        mine = self.merge(state, rnd, view)
        self.vote(rnd, mine)
        view = wait_view(self.client, rnd, stage, lambda v: v.complete, self.stop)
        if view is None:
            return state, None
        after = self.apply(state, rnd, view, mine)
        sha = self.checkpoint(rnd, after, state.sha) if self.plan.checkpoint_due(rnd) else state.sha
        self.worker.load_theta(after.theta)
        return RoundState(round=rnd + 1, theta_start=self.worker.theta(), momentum=after.momentum, sha=sha,
                          shard_refs=after.refs), after

    # ----- helpers -----
    def _report(self, rnd: int, sha: str, key: str) -> MergedAck | None:
        """Vote the full state and wait until the stage is published (None: it moved on first)."""
        try:
            report = MergedReport(round=rnd, sha256=sha, key=key)
            ack = self.client.merged(report)
            while not ack.published and not self.stop.is_set():
                self.stop.wait(0.2)
                ack = self.client.merged(report)
        except BridgeError as exc:
            if exc.status != 409:
                raise
            return None  # published meanwhile: the next assignment says which
        return ack

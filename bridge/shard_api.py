"""What the bridge does for each route of the sharded sync (`sync_*` in protocol/routes.py; state in
bridge.shard_round). No HTTP here.

As for whole states, a replica PUTs only to its own staging keys; a report copies each object
server-side to its write-once final key (no grant exists for it) before it counts, so what the
mergers, joiners and validators read is what was reported."""
from __future__ import annotations

import asyncio
import copy
import time
from typing import Any, Optional

from starlette.concurrency import run_in_threadpool

from bridge import rounds, shard_round, views
from bridge.records import StageState, TransitionError
from bridge.service import BridgeService
from bridge.shard_votes import KEEP_SHA
from bridge.storage import StorageError
from protocol import messages as msg
from protocol import sync_api as api

__all__ = ["ShardApi"]


async def _seal(svc: BridgeService, staging: str, final: str, size: int) -> None:
    """Copy one staged upload of exactly `size` bytes to its final key."""
    have = await run_in_threadpool(svc.object_size, staging)
    if have is None:
        raise TransitionError("missing_object", f"nothing was uploaded to {staging}")
    if have >= 0 and have != size:
        raise TransitionError("bad_size", f"{staging} holds {have} bytes, not {size}")
    try:
        await run_in_threadpool(svc.promote, staging, final, size)
    except StorageError as exc:
        raise TransitionError("storage_error", f"could not copy the upload: {exc}"[:500])


def _final(st: Any, caller: str, round_: int, kind: str, shard: int, sha: str) -> str:
    shard_round.need_sharded(st)
    m = rounds._member(st, caller, round_)
    if kind == "pg":
        return api.piece_key(st.run.run_id, round_, m.stage, caller, shard, sha)
    return api.update_key(st.run.run_id, round_, m.stage, shard, caller, sha)


class ShardApi:
    """The sharded sync's routes over one `BridgeService` (one method per route of protocol.routes)."""

    def __init__(self, svc: BridgeService, ttl: float) -> None:
        self.svc, self.run, self.ttl = svc, svc.run, ttl

    def _ref(self, d: Optional[dict]) -> Optional[api.UpdateRef]:
        return views.update_ref(d, self.svc.get_url, self.ttl)

    async def sync_upload(self, caller: str, req: api.SyncUpload) -> msg.UploadGrant:
        """A PUT grant to the caller's staging key of one shard object."""
        svc, run = self.svc, self.run
        if req.size > run.max_state_bytes:
            raise TransitionError("oversized", f"size={req.size} exceeds max_state_bytes={run.max_state_bytes}")
        final = svc.read(lambda st: _final(st, caller, req.round, req.kind, req.shard, req.sha256))
        expires = min(self.ttl, run.merge_timeout_seconds * 2)
        staging = api.staging_key(final, caller)
        return msg.UploadGrant(put_url=svc.put_url(staging, req.size, expires), key=staging,
                               expires_at=time.time() + expires)

    async def sync_pseudograd(self, caller: str, req: api.SyncPseudograd) -> msg.Ack:
        """Seal every shard of the caller's pseudo-gradient and enter it in the merge set."""
        svc, run = self.svc, self.run
        if len(req.shas) != run.sync_shards or len(req.sizes) != len(req.shas):
            raise TransitionError("bad_shards", f"{len(req.shas)} sha256s and {len(req.sizes)} sizes; "
                                  f"the run has sync_shards={run.sync_shards}")
        if any(not 0 < n <= run.max_state_bytes for n in req.sizes):
            raise TransitionError("bad_size", "every shard size must be in 1..max_state_bytes")
        finals = svc.read(lambda st: [_final(st, caller, req.round, "pg", s, sha)
                                      for s, sha in enumerate(req.shas)])
        have = svc.read(lambda st: st.pseudograds.get(st.miners[caller].stage, {}).get(caller)
                        if caller in st.miners else None)
        if have is None or have.get("shards") != list(req.shas):  # a repeat copies nothing
            await asyncio.gather(*[_seal(svc, api.staging_key(f, caller), f, n)
                                   for f, n in zip(finals, req.sizes)])

        def tx(st: Any, now: float, rng: Any) -> None:
            rounds.maybe_freeze(st, now)
            shard_round.report_pieces(st, caller, req.round, list(req.shas), list(req.sizes), finals, now)
        await svc.apply_async(tx)
        return msg.Ack()

    async def sync_votes(self, caller: str, req: api.SyncVotes) -> api.SyncVotesAck:
        """Seal the caller's merged updates and record its votes."""
        svc = self.svc
        finals = svc.read(lambda st: [_final(st, caller, req.round, "merged", v.shard, v.sha256)
                                      for v in req.votes])
        await asyncio.gather(*[_seal(svc, api.staging_key(f, caller), f, v.size)
                               for f, v in zip(finals, req.votes) if v.sha256 != KEEP_SHA])

        def tx(st: Any, now: float, rng: Any) -> dict:
            rounds.maybe_freeze(st, now)
            return shard_round.vote(st, caller, req.round, [(v.shard, v.sha256, f, v.size)
                                                           for f, v in zip(finals, req.votes)], now)
        return api.SyncVotesAck(agreed=await svc.apply_async(tx))

    async def sync_view(self, caller: str, req: msg.StageRound) -> api.SyncView:
        """A stage's sharded round: start checkpoint and updates since, pieces, ballot, decision."""
        svc, run, round_, stage = self.svc, self.run, req.round, req.stage
        if not 0 <= stage < run.n_stages:
            raise TransitionError("unknown_stage", f"stage {stage} does not exist")
        past = await run_in_threadpool(svc.db.round_archive, round_) if round_ < svc.read(lambda st: st.round) else None
        d = await svc.apply_async(lambda st, now, rng: _view_data(st, now, round_, stage, past))
        b = d["ballot"] or {}
        n = len(b.get("mergers", []))
        decided = b.get("decided", {})
        get = svc.get_url
        return api.SyncView(
            round=round_, stage=stage, shards=run.sync_shards,
            checkpoint=views.state_ref(stage, d["ss"], get, self.ttl), checkpoint_round=d["first"],
            updates=[api.RoundUpdate(round=d["first"] + i, shards=[self._ref(x) for x in u])
                     for i, u in enumerate(d["updates"])],
            frozen=d["frozen"],
            pieces=[api.PieceRef(hotkey=i["hotkey"], samples=i["samples"], epoch=i.get("epoch", 0),
                                 shas=i.get("shards", []), urls=[get(k, self.ttl) for k in i.get("finals", [])])
                    for i in d["items"]],
            mergers=b.get("mergers", []),
            votes=[{h: v["sha256"] for h, v in b.get("votes", {}).get(str(s), {}).items()} for s in range(n)],
            complete=d["complete"],
            decided=[self._ref(decided[str(s)]) for s in range(n)] if d["complete"] else [],
            disputes=sorted(int(s) for s in b.get("disputes", {}) if s not in decided),
            published=d["published"])

    async def sync_disputes(self, caller: str, req: None) -> api.SyncDisputes:
        """Disputed shards of the merging round."""
        open_ = self.svc.read(lambda st: copy.deepcopy(shard_round.open_disputes(st)))
        return api.SyncDisputes(disputes=[api.ShardDispute(
            round=d["round"], stage=d["stage"], shard=d["shard"], deadline=d["deadline"]) for d in open_])

    async def sync_arbitrate(self, caller: str, req: api.ShardArbitration) -> msg.Ack:
        """A validator's recomputed sha256 settles a disputed shard."""
        agreed = await self.svc.apply_async(lambda st, now, rng: shard_round.arbitrate(
            st, caller, req.round, req.stage, req.shard, req.sha256, now))
        return msg.Ack(message="a merger agreed" if agreed else "no merger agreed: the shard is kept")


def _view_data(st: Any, now: float, round_: int, stage: int, past: Optional[dict]) -> dict:
    """Plain data of a view, read in one transaction (the ballot opens once the set froze)."""
    shard_round.need_sharded(st)
    if round_ > st.round:
        raise TransitionError("future_round", f"round {round_} has not started (at {st.round})")
    current = round_ == st.round
    if current:
        rounds.maybe_freeze(st, now)
        if st.round != round_:  # the freeze published the stage and the round moved on
            raise TransitionError("moved_on", f"round {round_} just ended; ask again")
        start = st.round_states[stage] if st.round_states else vars(StageState())
        frozen = stage in st.frozen
        items = [dict(hotkey=h, **st.pseudograds[stage][h]) for h in st.frozen.get(stage, [])]
        b = shard_round.ballot(st, round_, stage, now) if st.phase == "merge" else None
    else:
        if past is None or stage >= len(past.get("states", [])):
            raise TransitionError("not_kept", f"round {round_} is not kept")
        start, frozen = past["states"][stage], True
        items = [p for p in past.get("pseudograds", []) if p.get("stage") == stage]
        b = shard_round.stored_ballot(st, round_, stage)
    ss = StageState(**start)
    first = ss.round if ss.key else 0
    return copy.deepcopy({
        "ss": ss, "first": first, "frozen": frozen, "items": items,
        "updates": shard_round.updates_since(st, stage, first, round_),
        "ballot": None if b is None else shard_round.ballot_dict(b),
        "complete": b is not None and len(b.decided) == len(b.mergers),
        "published": (not current) or bool(st.published.get(stage)) or st.phase == "done"})

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

from bridge import rounds, shard_checks, shard_round, views
from bridge.records import StageState, TransitionError
from bridge.service import BridgeService
from bridge.shard_votes import KEEP_SHA
from bridge.storage import StorageError
from protocol import messages as msg
from protocol import sync_api as api
from protocol.keys import staging_of
from protocol.lifecycle import Phase

__all__ = ["ShardApi"]


async def _seal(svc: BridgeService, staging: str, final: str, size: int) -> None:
    """Copy one staged upload of exactly `size` bytes to its final key."""
    try:
        await run_in_threadpool(svc.promote, staging, final, size)
    except StorageError as exc:
        raise TransitionError("storage_error", f"could not copy the upload: {exc}"[:500])


async def _seal_all(svc: BridgeService, caller: str, objects: list[tuple[str, int]]) -> None:
    """Seal every (final key, size): all staged uploads are HEADed before any is copied, so a
    missing or wrongly sized upload copies nothing."""
    if not objects:
        return
    staged = [staging_of(f) for f, _ in objects]
    have = await asyncio.gather(*[run_in_threadpool(svc.object_size, k) for k in staged])
    for k, n, (_, size) in zip(staged, have, objects):
        if n is None:
            raise TransitionError("missing_object", f"nothing was uploaded to {k}")
        if n >= 0 and n != size:
            raise TransitionError("bad_size", f"{k} holds {n} bytes, not {size}")
    await asyncio.gather(*[_seal(svc, k, f, size) for k, (f, size) in zip(staged, objects)])


class ShardApi:
    """The sharded sync's routes over one `BridgeService` (one method per route of protocol.routes)."""

    def __init__(self, svc: BridgeService, ttl: float) -> None:
        self.svc, self.run, self.ttl = svc, svc.run, ttl

    def _ref(self, d: Optional[dict]) -> Optional[api.UpdateRef]:
        return views.update_ref(d, self.svc.get_url, self.ttl)

    async def sync_upload(self, caller: str, req: api.SyncUpload) -> msg.UploadGrant:
        """A PUT grant to the caller's staging key of one shard object, for exactly its size."""
        svc, run = self.svc, self.run
        final = svc.read(lambda st: shard_checks.check_grant(st, caller, req.round, req.kind, req.shard,
                                                             req.sha256, req.size))
        expires = min(self.ttl, run.merge_timeout_seconds * 2)
        staging = staging_of(final)
        return msg.UploadGrant(put_url=svc.put_url(staging, req.size, expires), key=staging,
                               expires_at=time.time() + expires)

    async def sync_pseudograd(self, caller: str, req: api.SyncPseudograd) -> msg.Ack:
        """Seal every shard of the caller's pseudo-gradient and enter it in the merge set."""
        svc = self.svc
        sha = shard_round.pieces_sha(list(req.shas))
        finals, repeat = svc.read(lambda st: shard_checks.check_pieces(st, caller, req.round, req.shas,
                                                                       req.sizes, sha))
        if not repeat:  # a repeat copies nothing
            await _seal_all(svc, caller, list(zip(finals, req.sizes)))

        def tx(st: Any, now: float, rng: Any) -> None:
            rounds.maybe_freeze(st, now)
            rounds.report_pieces(st, caller, req.round, list(req.shas), list(req.sizes), finals, now)
        await svc.apply_async(tx)
        return msg.Ack()

    async def sync_votes(self, caller: str, req: api.SyncVotes) -> api.SyncVotesAck:
        """Check every vote, seal the caller's merged updates, then record the votes. A vote refused
        after its copy (the ballot changed meanwhile) has the copy deleted unless a vote holds it."""
        svc = self.svc
        cast = [(v.shard, v.sha256, v.size) for v in req.votes]
        finals = svc.read(lambda st: shard_checks.check_votes(st, caller, req.round, cast))
        sealed = [(f, v.size) for f, v in zip(finals, req.votes) if v.sha256 != KEEP_SHA]
        await _seal_all(svc, caller, sealed)

        def tx(st: Any, now: float, rng: Any) -> dict:
            rounds.maybe_freeze(st, now)
            return shard_round.vote(st, caller, req.round, [(v.shard, v.sha256, f, v.size)
                                                           for f, v in zip(finals, req.votes)], now)
        try:
            return api.SyncVotesAck(agreed=await svc.apply_async(tx))
        except TransitionError:
            def held(st: Any) -> set:
                m = st.miners.get(caller)
                return set() if m is None else shard_checks.recorded_keys(st, req.round, m.stage)
            keep = svc.read(held)
            await run_in_threadpool(svc.drop, [f for f, _ in sealed if f not in keep])
            raise

    async def sync_view(self, caller: str, req: msg.StageRound) -> api.SyncView:
        """A stage's sharded round: start checkpoint and updates since, pieces, ballot, decision."""
        svc, run, round_, stage = self.svc, self.run, req.round, req.stage
        if not 0 <= stage < run.n_stages:
            raise TransitionError("unknown_stage", f"stage {stage} does not exist")
        past = await run_in_threadpool(svc.db.round_archive, round_) if round_ < svc.read(lambda st: st.round) else None
        d = svc.read(lambda st: _view_data(st, round_, stage, past))  # a GET writes nothing
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
        def read(st: Any) -> list:
            shard_round.need_sharded(st)
            return copy.deepcopy(shard_round.open_disputes(st))
        return api.SyncDisputes(disputes=[api.ShardDispute(
            round=d["round"], stage=d["stage"], shard=d["shard"], deadline=d["deadline"])
            for d in self.svc.read(read)])

    async def sync_arbitrate(self, caller: str, req: api.ShardArbitration) -> msg.Ack:
        """A validator's recomputed sha256 settles a disputed shard."""
        def tx(st: Any, now: float, rng: Any) -> bool:
            shard_round.need_sharded(st)
            if req.stage >= st.run.n_stages:
                raise TransitionError("unknown_stage", f"stage {req.stage} does not exist")
            shard_checks.check_shard(st, req.shard)
            return shard_round.arbitrate(st, caller, req.round, req.stage, req.shard, req.sha256, now)
        agreed = await self.svc.apply_async(tx)
        return msg.Ack(message="a merger agreed" if agreed else "no merger agreed: the shard is kept")


def _view_data(st: Any, round_: int, stage: int, past: Optional[dict]) -> dict:
    """Plain data of a view, read under the state's lock. Read-only: the freeze (which opens the
    ballot) and every deadline are applied by the requests that change the round and by the
    bridge's clock (`bridge.clock`), never by a GET."""
    shard_round.need_sharded(st)
    if round_ > st.round:
        raise TransitionError("future_round", f"round {round_} has not started (at {st.round})")
    current = round_ == st.round
    if current:
        start = st.round_states[stage] if st.round_states else vars(StageState())
        frozen = stage in st.frozen
        items = [dict(hotkey=h, **st.pseudograds[stage][h]) for h in st.frozen.get(stage, [])]
        items = [i for i in items if len(i.get("shards", ())) == st.run.sync_shards]  # pieces only
        b = shard_round.stored_ballot(st, round_, stage)
    else:
        if past is None:  # the round ended between reading the round number and this read
            raise TransitionError("moved_on", f"round {round_} just ended; ask again")
        if stage >= len(past.get("states", [])):
            raise TransitionError("not_kept", f"round {round_} is not kept")
        start, frozen = past["states"][stage], True
        items = [p for p in past.get("pseudograds", [])
                 if p.get("stage") == stage and len(p.get("shards", ())) == st.run.sync_shards]
        b = shard_round.stored_ballot(st, round_, stage)
    ss = StageState(**start)
    first = ss.round if ss.key else 0
    return copy.deepcopy({
        "ss": ss, "first": first, "frozen": frozen, "items": items,
        "updates": shard_round.updates_since(st, stage, first, round_),
        "ballot": None if b is None else shard_round.ballot_dict(b),
        "complete": b is not None and len(b.decided) == len(b.mergers),
        "published": (not current) or bool(st.published.get(stage)) or st.phase == Phase.DONE})

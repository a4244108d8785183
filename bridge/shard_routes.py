"""Routes of the sharded sync (paths in protocol.sync_api; state in bridge.shard_round).

As for whole states, a replica PUTs only to its own staging keys; a report copies each object
server-side to its write-once final key (no grant exists for it) before it counts, so what the
mergers, joiners and validators read is what was reported."""
from __future__ import annotations

import asyncio
import copy
import time
from typing import Any, Callable, Optional

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from bridge import rounds, shard_round, views
from bridge.records import StageState, TransitionError
from bridge.service import BridgeService
from bridge.shard_votes import KEEP_SHA
from bridge.storage import StorageError
from protocol import messages as msg
from protocol import sync_api as api

__all__ = ["add_shard_routes"]


def _json(model: Any) -> Response:
    return Response(content=model.model_dump_json(), media_type="application/json")


async def _seal(svc: BridgeService, staging: str, final: str, size: int) -> None:
    """Copy one staged upload of exactly `size` bytes to its final key."""
    have = await run_in_threadpool(svc.object_size, staging)
    if have is None:
        raise TransitionError(400, "missing_object", f"nothing was uploaded to {staging}")
    if have >= 0 and have != size:
        raise TransitionError(400, "bad_size", f"{staging} holds {have} bytes, not {size}")
    try:
        await run_in_threadpool(svc.promote, staging, final, size)
    except StorageError as exc:
        raise TransitionError(503, "storage_error", f"could not copy the upload: {exc}"[:500])


def _final(st: Any, caller: str, round_: int, kind: str, shard: int, sha: str) -> str:
    shard_round.need_sharded(st)
    m = rounds._member(st, caller, round_)
    if kind == "pg":
        return api.piece_key(st.run.run_id, round_, m.stage, caller, shard, sha)
    return api.update_key(st.run.run_id, round_, m.stage, shard, caller, sha)


def add_shard_routes(app: FastAPI, svc: BridgeService, ttl: float, miner: Callable,
                     validator: Callable, reader: Callable) -> None:
    """Register the sharded sync's routes (`reader`: miners and validators)."""
    run = svc.run

    def ref(d: Optional[dict]) -> Optional[api.UpdateRef]:
        if d is None:
            return None
        return api.UpdateRef(sha256=d["sha256"], size=d["size"], key=d["key"], url=svc.get_url(d["key"], ttl),
                             alt_urls=[svc.get_url(k, ttl) for k in d.get("alt_keys", [])])

    @app.post(api.SYNC_UPLOAD)
    async def upload(req: api.SyncUpload, caller: str = Depends(miner)) -> Response:
        if req.size > run.max_state_bytes:
            raise TransitionError(400, "oversized", f"size={req.size} exceeds max_state_bytes={run.max_state_bytes}")
        final = svc.read(lambda st: _final(st, caller, req.round, req.kind, req.shard, req.sha256))
        expires = min(ttl, run.merge_timeout_seconds * 2)
        return _json(msg.UploadGrant(put_url=svc.put_url(api.staging_key(final, caller), req.size, expires),
                                     key=api.staging_key(final, caller), expires_at=time.time() + expires))

    @app.post(api.SYNC_PSEUDOGRAD)
    async def pseudograd(req: api.SyncPseudograd, caller: str = Depends(miner)) -> Response:
        if len(req.shas) != run.sync_shards or len(req.sizes) != len(req.shas):
            raise TransitionError(400, "bad_shards", f"{len(req.shas)} sha256s and {len(req.sizes)} sizes; "
                                  f"the run has sync_shards={run.sync_shards}")
        if any(not 0 < n <= run.max_state_bytes for n in req.sizes):
            raise TransitionError(400, "bad_size", "every shard size must be in 1..max_state_bytes")
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
        return _json(msg.Ack())

    @app.post(api.SYNC_VOTES)
    async def shard_votes(req: api.SyncVotes, caller: str = Depends(miner)) -> Response:
        finals = svc.read(lambda st: [_final(st, caller, req.round, "merged", v.shard, v.sha256)
                                      for v in req.votes])
        await asyncio.gather(*[_seal(svc, api.staging_key(f, caller), f, v.size)
                               for f, v in zip(finals, req.votes) if v.sha256 != KEEP_SHA])

        def tx(st: Any, now: float, rng: Any) -> dict:
            rounds.maybe_freeze(st, now)
            return shard_round.vote(st, caller, req.round, [(v.shard, v.sha256, f, v.size)
                                                           for f, v in zip(finals, req.votes)], now)
        return _json(api.SyncVotesAck(agreed=await svc.apply_async(tx)))

    @app.get(api.SYNC_VIEW)
    async def view(round_: int, stage: int, caller: str = Depends(reader)) -> Response:
        if not 0 <= stage < run.n_stages:
            raise TransitionError(404, "unknown_stage", f"stage {stage} does not exist")
        past = await run_in_threadpool(svc.db.round_archive, round_) if round_ < svc.read(lambda st: st.round) else None

        def tx(st: Any, now: float, rng: Any) -> dict:
            shard_round.need_sharded(st)
            if round_ > st.round:
                raise TransitionError(409, "future_round", f"round {round_} has not started (at {st.round})")
            current = round_ == st.round
            if current:
                rounds.maybe_freeze(st, now)
                if st.round != round_:  # the freeze published the stage and the round moved on
                    raise TransitionError(409, "moved_on", f"round {round_} just ended; ask again")
                start = st.round_states[stage] if st.round_states else vars(StageState())
                frozen = stage in st.frozen
                items = [dict(hotkey=h, **st.pseudograds[stage][h]) for h in st.frozen.get(stage, [])]
                b = shard_round.ballot(st, round_, stage, now) if st.phase == "merge" else None
            else:
                if past is None or stage >= len(past.get("states", [])):
                    raise TransitionError(409, "not_kept", f"round {round_} is not kept")
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
        d = await svc.apply_async(tx)
        b = d["ballot"] or {}
        n = len(b.get("mergers", []))
        decided = b.get("decided", {})
        out = api.SyncView(
            round=round_, stage=stage, shards=run.sync_shards,
            checkpoint=views.state_ref(stage, d["ss"], svc.get_url, ttl), checkpoint_round=d["first"],
            updates=[api.RoundUpdate(round=d["first"] + i, shards=[ref(x) for x in u])
                     for i, u in enumerate(d["updates"])],
            frozen=d["frozen"],
            pieces=[api.PieceRef(hotkey=i["hotkey"], samples=i["samples"], epoch=i.get("epoch", 0),
                                 shas=i.get("shards", []), urls=[svc.get_url(k, ttl) for k in i.get("finals", [])])
                    for i in d["items"]],
            mergers=b.get("mergers", []),
            votes=[{h: v["sha256"] for h, v in b.get("votes", {}).get(str(s), {}).items()} for s in range(n)],
            complete=d["complete"],
            decided=[ref(decided[str(s)]) for s in range(n)] if d["complete"] else [],
            disputes=sorted(int(s) for s in b.get("disputes", {}) if s not in decided),
            published=d["published"])
        return _json(out)

    @app.get(api.SYNC_DISPUTES)
    async def disputes(caller: str = Depends(validator)) -> Response:
        open_ = svc.read(lambda st: copy.deepcopy(shard_round.open_disputes(st)))
        return _json(api.SyncDisputes(disputes=[api.ShardDispute(
            round=d["round"], stage=d["stage"], shard=d["shard"], deadline=d["deadline"]) for d in open_]))

    @app.post(api.SYNC_ARBITRATE)
    async def arbitrate(req: api.ShardArbitration, caller: str = Depends(validator)) -> Response:
        agreed = await svc.apply_async(lambda st, now, rng: shard_round.arbitrate(
            st, caller, req.round, req.stage, req.shard, req.sha256, now))
        return _json(msg.Ack(message="a merger agreed" if agreed else "no merger agreed: the shard is kept"))

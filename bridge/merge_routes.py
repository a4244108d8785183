"""Routes of the merge and of its integrity: uploads, pseudo-gradient and merged-state reports,
the frozen merge set, the validators' hop log, disputes, arbitration and verdicts.

Every report names the caller's own staging key; the key is checked before the store is looked
at (so the answer never depends on which objects exist), then the bridge copies the upload to a
final key no one holds a grant for and records that (write-once)."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Optional

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from bridge import quarantine, rounds, views, votes
from bridge.records import StageState, TransitionError
from bridge.service import BridgeService
from bridge.storage import StorageError
from protocol import integrity as integ
from protocol import messages as msg
from resbm.shards import assign_mergers

__all__ = ["add_merge_routes"]


def _json(model: Any) -> Response:
    return Response(content=model.model_dump_json(), media_type="application/json")


def add_merge_routes(app: FastAPI, svc: BridgeService, ttl: float, miner: Callable,
                     validator: Callable) -> None:
    """Register the merge routes on `app` (`miner` / `validator`: the auth dependencies)."""
    run = svc.run

    def item(i: dict) -> msg.MergeItem:
        return msg.MergeItem(hotkey=i["hotkey"], stage=i.get("stage", 0), key=i["key"], sha256=i["sha256"], size=i["size"],
                             samples=i["samples"], epoch=i.get("epoch", 0),
                             get_url=svc.get_url(i["key"], ttl))

    async def archive(round_: int) -> Optional[dict]:
        return await run_in_threadpool(svc.db.round_archive, round_)

    async def promote(staging: str, final: str, size: Optional[int]) -> int:
        """HEAD the staging upload (exact size when given), then copy it to its final key."""
        have = await run_in_threadpool(svc.object_size, staging)
        if have is None:
            raise TransitionError("missing_object", f"no object at {staging}")
        if size is not None and have >= 0 and have != size:
            raise TransitionError("bad_size", f"object {staging} has {have} bytes, not {size}")
        try:
            await run_in_threadpool(svc.promote, staging, final, max(have, 0))
        except StorageError as exc:  # the store failed, not the caller: retry later
            raise TransitionError("storage_error", f"could not copy the upload: {exc}"[:500])
        return max(have, 0)

    def moved_on(round_: int) -> bool:
        return svc.read(lambda st: rounds.moved_on(st, round_))

    @app.post("/v1/rounds/upload")
    async def upload(req: msg.UploadRequest, caller: str = Depends(miner)) -> Response:
        if req.size > run.max_state_bytes:
            raise TransitionError("oversized",
                                  f"size={req.size} exceeds max_state_bytes={run.max_state_bytes}")
        key = svc.read(lambda st: rounds.upload_key(st, caller, req.round, req.kind, req.sha256))
        expires = min(ttl, run.merge_timeout_seconds * 2)
        return _json(msg.UploadGrant(put_url=svc.put_url(key, req.size, expires), key=key,
                                     expires_at=time.time() + expires))

    async def late_pseudograd(req: msg.PseudogradReport, caller: str) -> Response:
        rounds.check_archived_pseudograd(await archive(req.round), caller, req.round,
                                         req.key, req.sha256, req.size)
        return _json(msg.Ack(message=f"already recorded for round {req.round}"))

    @app.post("/v1/rounds/pseudograd")
    async def pseudograd(req: msg.PseudogradReport, caller: str = Depends(miner)) -> Response:
        if moved_on(req.round):
            return await late_pseudograd(req, caller)
        final = svc.read(lambda st: rounds.check_upload_key(st, caller, req.round, "pseudograd",
                                                            req.key, req.sha256))
        await promote(req.key, final, req.size)

        def tx(st: Any, now: float, rng: Any) -> None:
            rounds.maybe_freeze(st, now)
            rounds.report_pseudograd(st, caller, req.round, final, req.sha256, req.size, now)
        try:
            await svc.apply_async(tx)
        except TransitionError as exc:  # the round may have moved on while we copied the object
            if exc.code == "not_merging" and moved_on(req.round):
                return await late_pseudograd(req, caller)
            raise
        return _json(msg.Ack())

    @app.get("/v1/rounds/{round_}/stages/{stage}/pseudograds")
    async def merge_set(round_: int, stage: int, caller: str = Depends(miner)) -> Response:
        def tx(st: Any, now: float, rng: Any) -> list:
            rounds.maybe_freeze(st, now)
            return rounds.merge_set(st, round_, stage)
        items = await svc.apply_async(tx)
        return _json(msg.MergeSet(round=round_, stage=stage, items=[item(i) for i in items]))

    @app.get("/v1/rounds/{round_}/stages/{stage}/shards")
    async def shard_plan(round_: int, stage: int, caller: str = Depends(miner)) -> Response:
        def tx(st: Any, now: float, rng: Any) -> list:
            rounds.maybe_freeze(st, now)
            return [i["hotkey"] for i in rounds.merge_set(st, round_, stage)]
        hotkeys = await svc.apply_async(tx)
        return _json(msg.ShardPlan(round=round_, stage=stage, shards=run.sync_shards, mergers=assign_mergers(
            round_, stage, hotkeys, run.sync_shards, run.sync_mergers)))

    async def late_merged(req: msg.MergedReport, caller: str) -> Response:
        arch = await archive(req.round + 1)
        stage, ss = svc.read(lambda st: rounds.published_state(
            st, caller, req.round, req.sha256, req.key, arch))
        own = await archive(req.round)
        if own is not None and votes.add_late_vote(own, caller, stage, req.sha256):
            # a vote that came after the run moved on is still evidence for the validators
            await svc.apply_async(lambda st, now, rng: st.archive_round(req.round, own))
        ref = views.state_ref(stage, ss, svc.get_url, ttl)
        return _json(msg.MergedAck(published=True, agreed=ss.sha256 == req.sha256, state=ref))

    @app.post("/v1/rounds/merged")
    async def merged(req: msg.MergedReport, caller: str = Depends(miner)) -> Response:
        if moved_on(req.round):
            return await late_merged(req, caller)
        final = svc.read(lambda st: rounds.check_upload_key(st, caller, req.round, "state",
                                                            req.key, req.sha256))
        size = svc.read(lambda st: votes.recorded_size(st, caller, req.sha256))
        if size is None:  # a repeat of a recorded vote (polling for publication) copies nothing
            size = await promote(req.key, final, None)

        def tx(st: Any, now: float, rng: Any) -> tuple:
            rounds.maybe_freeze(st, now)
            stage = st.miners[caller].stage if caller in st.miners else 0
            agreed = votes.report_merged(st, caller, req.round, req.sha256, final, size, now)
            return agreed, stage, copy.copy(st.stage_states[stage])
        try:
            agreed, stage, ss = await svc.apply_async(tx)
        except TransitionError as exc:  # the run may have moved on while we copied the object
            if exc.code == "not_merging" and moved_on(req.round):
                return await late_merged(req, caller)
            raise
        ref = views.state_ref(stage, ss, svc.get_url, ttl) if agreed is not None else None
        return _json(msg.MergedAck(published=agreed is not None, agreed=agreed, state=ref))

    @app.get("/v1/validator/hoplog")
    async def hoplog(round: int, hotkey: Optional[str] = None,
                     caller: str = Depends(validator)) -> Response:
        if round < 0:
            raise TransitionError("bad_request", "round must be >= 0")
        hops = await run_in_threadpool(svc.db.done_hops, round, hotkey)
        recs = [views.hop_record(h, svc.get_url, ttl) for h in hops]
        arch = await archive(round) or {}
        states = [views.state_ref(s, StageState(**d), svc.get_url, ttl)
                  for s, d in enumerate(arch.get("states", []))]
        return _json(msg.HopLog(round=round, records=recs, states=[s for s in states if s],
                                pseudograds=[item(p) for p in arch.get("pseudograds", [])],
                                votes=[msg.Vote(**v) for v in arch.get("votes", [])],
                                flagged=arch.get("flagged", [])))

    @app.get("/v1/validator/disputes")
    async def disputes(caller: str = Depends(validator)) -> Response:
        open_ = svc.read(lambda st: copy.deepcopy(votes.open_disputes(st)))
        return _json(integ.DisputeList(disputes=[integ.Dispute(
            round=d["round"], stage=d["stage"], deadline=d["deadline"],
            start=views.state_ref(d["stage"], d["start"], svc.get_url, ttl),
            items=[item(i) for i in d["items"]],
            votes=[integ.DisputeVote(hotkey=h, sha256=s) for h, s in d["votes"].items()])
            for d in open_]))

    @app.post("/v1/validator/arbitrate")
    async def arbitrate(req: integ.Arbitration, caller: str = Depends(validator)) -> Response:
        agreed = await svc.apply_async(lambda st, now, rng: votes.arbitrate(
            st, caller, req.round, req.stage, req.sha256, now))
        return _json(integ.ArbitrationAck(agreed=agreed))

    @app.post("/v1/validator/verdicts")
    async def verdicts(req: integ.VerdictReport, caller: str = Depends(validator)) -> Response:
        def tx(st: Any, now: float, rng: Any) -> dict:
            out = {}
            for v in req.verdicts:
                if v.hotkey not in st.miners:
                    continue  # deregistered since: nothing to quarantine
                until = quarantine.record_verdict(st, caller, req.round, v.hotkey, v.passed, v.reason)
                if not v.passed and until > st.round:
                    out[v.hotkey] = until
            return out
        return _json(integ.VerdictAck(quarantined=await svc.apply_async(tx)))

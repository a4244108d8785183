"""What the bridge does for each route of a round's merge (one method per route of
`protocol.routes`; the state is bridge.merging, the screening bridge.merge_checks): the sync's
pieces, shard votes and view, the checkpoints' full-state uploads and votes (late ones answered
from the round archive), the validators' hop log, disputes, arbitrations and verdicts. No HTTP here.

A replica PUTs only to its own staging keys; every report names objects whose keys are checked
before the store is looked at (so an answer never depends on which objects exist); the bridge
then copies each object server-side to its write-once final key (no grant exists for it) before
it counts, so what mergers, joiners and validators read is what was reported. Reads (the view,
the disputes) never write: they see the merges as they stand at the request's time."""
from __future__ import annotations

import asyncio
import copy
import time
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

from starlette.concurrency import run_in_threadpool

from bridge import merge_checks, merging, quarantine, rounds, views
from bridge.ballot import KEEP_SHA, Cast
from bridge.records import StageState, State, TransitionError
from bridge.service import BridgeService
from bridge.stage_merge import MergePhase, StageMerge
from bridge.storage import StorageError
from protocol import integrity as integ
from protocol import messages as msg
from protocol import sync_api as api
from protocol.keys import PieceKey
from protocol.lifecycle import Phase
from protocol.sync_plan import sync_plan

__all__ = ["MergeApi"]

T = TypeVar("T")


def _in_merge(fn: Callable[[State, float], T]) -> Callable[[State, float, Any], T]:
    """A merge transition: time applied to the merges first, and the next round started after it
    when every stage's merge is done."""
    def tx(st: State, now: float, rng: Any) -> T:
        rounds.settle(st, now)
        out = fn(st, now)
        rounds.settle(st, now)
        return out
    return tx


class MergeApi:
    """Merge, sync and integrity routes over one `BridgeService`."""

    def __init__(self, svc: BridgeService, ttl: float) -> None:
        self.svc, self.run_cfg, self.ttl = svc, svc.run, ttl

    def _read(self, fn: Callable[[State, float], T]) -> T:
        now = self.svc.clock()
        return self.svc.read(lambda st: fn(st, now))

    async def _archive(self, round_: int) -> Optional[dict]:
        return await run_in_threadpool(self.svc.db.round_archive, round_)

    async def _seal(self, objects: Sequence[tuple[str, str, Optional[int]]]) -> list[int]:
        """Copy each (staging, final, exact size or None) upload to its final key; every staging
        object is HEADed before any is copied, so a missing or wrongly sized one copies nothing."""
        svc = self.svc
        have = await asyncio.gather(*[run_in_threadpool(svc.object_size, k) for k, _, _ in objects])
        for (k, _, size), n in zip(objects, have):
            if n is None:
                raise TransitionError("missing_object", f"nothing was uploaded to {k}")
            if size is not None and n >= 0 and n != size:
                raise TransitionError("bad_size", f"{k} holds {n} bytes, not {size}")
        sizes = [max(n, 0) if size is None else size for (_, _, size), n in zip(objects, have)]
        try:
            await asyncio.gather(*[run_in_threadpool(svc.promote, k, f, n)
                                   for (k, f, _), n in zip(objects, sizes)])
        except StorageError as exc:  # the store failed, not the caller: retry later
            raise TransitionError("storage_error", f"could not copy the upload: {exc}"[:500])
        return sizes

    def _ref(self, d: Any) -> Optional[api.UpdateRef]:
        if d is None:
            return None
        get = self.svc.get_url
        return api.UpdateRef(sha256=d.sha256, size=d.size, key=d.key, url=get(d.key, self.ttl),
                             alt_urls=[get(k, self.ttl) for k in d.alt_keys])

    # ---- the sync: pieces, shard votes, the view ----------------------------------------------
    async def sync_upload(self, caller: str, req: api.SyncUpload) -> msg.UploadGrant:
        """A PUT grant to the caller's staging key of one shard object, for exactly its size."""
        svc, run = self.svc, self.run_cfg
        key = self._read(lambda st, now: merge_checks.check_grant(st, caller, req.round, req.kind, req.shard,
                                                                  req.sha256, req.size, now))
        expires = min(self.ttl, run.merge_timeout_seconds * 2)
        return msg.UploadGrant(put_url=svc.put_url(key.staging, req.size, expires), key=key.staging,
                               expires_at=time.time() + expires)

    async def sync_pseudograd(self, caller: str, req: api.SyncPseudograd) -> msg.Ack:
        """Seal every shard of the caller's pseudo-gradient and enter it in the merge set."""
        shas, sizes = list(req.shas), list(req.sizes)
        keys, repeat = self._read(lambda st, now: merge_checks.check_pieces(st, caller, req.round, shas, sizes, now))
        if not repeat:  # a repeat copies nothing
            await self._seal([(k.staging, k.final, n) for k, n in zip(keys, sizes)])

        def report(st: State, now: float) -> None:
            merge_checks.check_pieces(st, caller, req.round, shas, sizes, now)
            merging.report(st, caller, req.round, shas, sizes, now)
        await self.svc.apply_async(_in_merge(report))
        return msg.Ack()

    async def sync_votes(self, caller: str, req: api.SyncVotes) -> api.SyncVotesAck:
        """Check every vote, seal the caller's merged updates, then record the votes. A vote refused
        after its copy (the ballot changed meanwhile) has the copy deleted unless a vote holds it."""
        cast = [(v.shard, v.sha256, v.size) for v in req.votes]
        keys = self._read(lambda st, now: merge_checks.check_votes(st, caller, req.round, cast, now))
        sealed = [(k.staging, k.final, v.size) for k, v in zip(keys, req.votes) if v.sha256 != KEEP_SHA]
        await self._seal(sealed)

        def vote(st: State, now: float) -> dict:
            merge_checks.check_votes(st, caller, req.round, cast, now)  # a refusal records none of them
            return merging.vote_shards(st, caller, req.round, [(v.shard, Cast(v.sha256, k.final, v.size))
                                                               for k, v in zip(keys, req.votes)], now)
        try:
            return api.SyncVotesAck(agreed=await self.svc.apply_async(_in_merge(vote)))
        except TransitionError:
            def held(st: State) -> set:
                m = st.miners.get(caller)
                return set() if m is None else merge_checks.recorded_keys(st, req.round, m.stage)
            keep = self.svc.read(held)
            await run_in_threadpool(self.svc.drop, [f for _, f, _ in sealed if f not in keep])
            raise

    async def sync_view(self, caller: str, req: msg.StageRound) -> api.SyncView:
        """A stage's round: start checkpoint and updates since, pieces, ballot, decision (a read)."""
        run, round_, stage = self.run_cfg, req.round, req.stage
        if not 0 <= stage < run.n_stages:
            raise TransitionError("unknown_stage", f"stage {stage} does not exist")
        past = await self._archive(round_) if round_ < self.svc.read(lambda st: st.round) else None
        d = self._read(lambda st, now: _view_data(st, now, round_, stage, past))
        m: Optional[StageMerge] = d["merge"]
        b = None if m is None else m.shards
        get = self.svc.get_url
        return api.SyncView(
            round=round_, stage=stage, shards=sync_plan(run).shards,
            checkpoint=views.state_ref(stage, d["ss"], get, self.ttl), checkpoint_round=d["first"],
            updates=[api.RoundUpdate(round=d["first"] + i, shards=[self._ref(x) for x in u])
                     for i, u in enumerate(d["updates"])],
            frozen=d["frozen"],
            pieces=[api.PieceRef(hotkey=i["hotkey"], samples=i["samples"], epoch=i["epoch"], shas=i["shas"],
                                 urls=[get(PieceKey(run.run_id, round_, stage, i["hotkey"], s, h).final, self.ttl)
                                       for s, h in enumerate(i["shas"])])
                    for i in d["items"]],
            mergers=[] if b is None else b.voters,
            votes=[] if b is None else [{h: c.sha256 for h, c in v.items()} for v in b.votes],
            complete=d["complete"],
            decided=[self._ref(x) for x in d["decided"]],
            disputes=[] if b is None else [s for s, _ in sorted(b.disputes.items()) if s not in b.decided],
            published=d["published"])

    async def sync_disputes(self, caller: str, req: None) -> api.SyncDisputes:
        """Disputed shards of the merging round."""
        return api.SyncDisputes(disputes=[api.ShardDispute(**d) for d in self._read(merging.shard_disputes)])

    async def sync_arbitrate(self, caller: str, req: api.ShardArbitration) -> msg.Ack:
        """A validator's recomputed sha256 settles a disputed shard."""
        def arbitrate(st: State, now: float) -> bool:
            if req.stage >= st.run.n_stages:
                raise TransitionError("unknown_stage", f"stage {req.stage} does not exist")
            merge_checks.check_shard(st, req.shard)
            return merging.arbitrate_shard(st, caller, req.round, req.stage, req.shard, req.sha256, now)
        agreed = await self.svc.apply_async(_in_merge(arbitrate))
        return msg.Ack(message="a merger agreed" if agreed else "no merger agreed: the shard is kept")

    # ---- checkpoints: the full state's upload and vote ----------------------------------------
    async def _unless_moved_on(self, round_: int, live: Callable[[], Awaitable[T]],
                               late: Callable[[], Awaitable[T]]) -> T:
        """`live()`, or `late()` when round `round_` is over (also if it ended during `live`)."""
        if self.svc.read(lambda st: rounds.moved_on(st, round_)):
            return await late()
        try:
            return await live()
        except TransitionError as exc:  # the round may have moved on while we copied the object
            if exc.code == "not_merging" and self.svc.read(lambda st: rounds.moved_on(st, round_)):
                return await late()
            raise

    async def upload(self, caller: str, req: msg.UploadRequest) -> msg.UploadGrant:
        """A presigned PUT to the caller's staging key for the full state of a checkpoint round."""
        run = self.run_cfg
        if req.size > run.max_state_bytes:
            raise TransitionError("oversized", f"size={req.size} exceeds max_state_bytes={run.max_state_bytes}")
        key = self._read(lambda st, now: merge_checks.check_state_grant(st, caller, req.round, req.sha256, now))
        expires = min(self.ttl, run.merge_timeout_seconds * 2)
        return msg.UploadGrant(put_url=self.svc.put_url(key.staging, req.size, expires), key=key.staging,
                               expires_at=time.time() + expires)

    async def merged(self, caller: str, req: msg.MergedReport) -> msg.MergedAck:
        """Record a full-state vote; answers the published state once there is one."""
        svc = self.svc

        async def live() -> msg.MergedAck:
            key = self._read(lambda st, now: merge_checks.check_state_report(st, caller, req.round, req.key,
                                                                             req.sha256, now))
            size = svc.read(lambda st: merge_checks.recorded_state_vote(st, caller, req.round, req.sha256))
            if size is None:  # a repeat of a recorded vote (polling for publication) copies nothing
                (size,) = await self._seal([(key.staging, key.final, None)])

            def vote(st: State, now: float) -> tuple:
                agreed = merging.vote_state(st, caller, req.round, Cast(req.sha256, key.final, size), now)
                return agreed, copy.copy(st.stage_states[key.stage])
            agreed, ss = await svc.apply_async(_in_merge(vote))
            ref = views.state_ref(key.stage, ss, svc.get_url, self.ttl) if agreed is not None else None
            return msg.MergedAck(published=agreed is not None, agreed=agreed, state=ref)
        return await self._unless_moved_on(req.round, live, lambda: self._late_merged(caller, req))

    async def _late_merged(self, caller: str, req: msg.MergedReport) -> msg.MergedAck:
        svc = self.svc
        arch = await self._archive(req.round + 1)
        stage, ss = svc.read(lambda st: rounds.published_state(st, caller, req.round, req.sha256, req.key, arch))
        own = await self._archive(req.round)
        if own is not None and _add_late_vote(own, caller, stage, req.sha256):
            # a vote that came after the run moved on is still evidence for the validators
            await svc.apply_async(lambda st, now, rng: st.archive_round(req.round, own))
        ref = views.state_ref(stage, ss, svc.get_url, self.ttl)
        return msg.MergedAck(published=True, agreed=ss.sha256 == req.sha256, state=ref)

    # ---- validators ---------------------------------------------------------------------------
    async def hoplog(self, caller: str, req: msg.HopLogQuery) -> msg.HopLog:
        """A round's done hops, start states, merge sets, full-state votes and flags."""
        svc, ttl = self.svc, self.ttl
        hops = await run_in_threadpool(svc.db.done_hops, req.round, req.hotkey)
        arch = await self._archive(req.round) or {}
        states = [views.state_ref(s, StageState(**d), svc.get_url, ttl) for s, d in enumerate(arch.get("states", []))]
        return msg.HopLog(round=req.round, records=[views.hop_record(h, svc.get_url, ttl) for h in hops],
                          states=[s for s in states if s], pseudograds=[msg.MergeItem(**p) for p in arch.get("pseudograds", [])],
                          votes=[msg.Vote(**v) for v in arch.get("votes", [])], flagged=arch.get("flagged", []))

    async def disputes(self, caller: str, req: None) -> integ.DisputeList:
        """Disputed checkpoints awaiting a validator's recomputation."""
        open_ = self._read(lambda st, now: copy.deepcopy(merging.state_disputes(st, now)))
        return integ.DisputeList(disputes=[integ.Dispute(
            round=d["round"], stage=d["stage"], deadline=d["deadline"],
            start=views.state_ref(d["stage"], d["start"], self.svc.get_url, self.ttl),
            items=[msg.MergeItem(**i) for i in d["items"]],
            votes=[integ.DisputeVote(hotkey=h, sha256=s) for h, s in d["votes"].items()]) for d in open_])

    async def arbitrate(self, caller: str, req: integ.Arbitration) -> integ.ArbitrationAck:
        """A validator's recomputed full state settles a disputed checkpoint."""
        agreed = await self.svc.apply_async(_in_merge(lambda st, now: merging.arbitrate_state(
            st, caller, req.round, req.stage, req.sha256, now)))
        return integ.ArbitrationAck(agreed=agreed)

    async def verdicts(self, caller: str, req: integ.VerdictReport) -> integ.VerdictAck:
        """Audit verdicts; failed miners are quarantined (answers who, until which round)."""
        def record(st: State, now: float) -> dict:
            out = {}
            for v in req.verdicts:
                if v.hotkey not in st.miners:
                    continue  # deregistered since: nothing to quarantine
                until = quarantine.record_verdict(st, caller, req.round, v.hotkey, v.passed, v.reason)
                if not v.passed and until > st.round:
                    out[v.hotkey] = until
            return out
        return integ.VerdictAck(quarantined=await self.svc.apply_async(_in_merge(record)))


def _add_late_vote(archive: dict[str, Any], hotkey: str, stage: int, sha256: str) -> bool:
    """Add a merge-set member's full-state vote that came after its round was archived (first only)."""
    cast = archive.setdefault("votes", [])
    members = {(p["hotkey"], p.get("stage")) for p in archive.get("pseudograds", [])}
    if (hotkey, stage) not in members or any(v["hotkey"] == hotkey for v in cast):
        return False
    cast.append({"hotkey": hotkey, "stage": stage, "sha256": sha256})
    return True


def _view_data(st: State, now: float, round_: int, stage: int, past: Optional[dict]) -> dict:
    """Plain data of a view, read at `now` without writing (a merge due by now is shown as it will be)."""
    if round_ > st.round:
        raise TransitionError("future_round", f"round {round_} has not started (at {st.round})")
    current = round_ == st.round
    if current:
        start = st.round_states[stage] if st.round_states else vars(StageState())
        m = merging.view(st, round_, stage, now)
    else:
        if past is None or stage >= len(past.get("states", [])):
            raise TransitionError("not_kept", f"round {round_} is not kept")
        start, m = past["states"][stage], merging.view(st, round_, stage, now)
    ss = StageState(**start)
    first = ss.round if ss.key else 0
    updates = merging.updates_since(st, stage, first, round_)
    if m is not None:
        items = [merging.item_of(stage, h, r) for h, r in m.items()]
    else:  # the round's merge is no longer kept: its set from the archive
        items = [p for p in (past or {}).get("pseudograds", []) if p.get("stage") == stage]
    upd = None if m is None else merging.update_of(st, m)
    return copy.deepcopy({
        "ss": ss, "first": first, "updates": updates, "merge": m, "items": items,
        "frozen": (not current) or (m is not None and m.phase != MergePhase.COLLECTING),
        "complete": upd is not None, "decided": upd or [],
        "published": (not current) or (m is not None and m.done) or st.phase == Phase.DONE})

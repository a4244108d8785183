"""What the bridge does for each merge-phase and integrity route: uploads, pseudo-gradient and
merged-state reports (late ones answered from the round archive), the frozen merge set and its
shard plan, the validators' hop log, disputes, arbitration and verdicts. One method per route
of `protocol.routes`; no HTTP here.

Every report names the caller's own staging key; the key is checked before the store is looked
at (so the answer never depends on which objects exist), then the bridge copies the upload to a
final key no one holds a grant for and records that (write-once)."""
from __future__ import annotations

import copy
import time
from typing import Any, Awaitable, Callable, Optional, TypeVar

from starlette.concurrency import run_in_threadpool

from bridge import quarantine, rounds, views, votes
from bridge.records import StageState, TransitionError
from bridge.service import BridgeService
from bridge.storage import StorageError
from protocol import integrity as integ
from protocol import messages as msg
from spec.shard_layout import assign_mergers

__all__ = ["MergeApi"]

T = TypeVar("T")


class MergeApi:
    """Merge and integrity routes over one `BridgeService`."""

    def __init__(self, svc: BridgeService, ttl: float) -> None:
        self.svc, self.run_cfg, self.ttl = svc, svc.run, ttl

    def _item(self, i: dict) -> msg.MergeItem:
        return views.merge_item(i, self.svc.get_url, self.ttl)

    async def _archive(self, round_: int) -> Optional[dict]:
        return await run_in_threadpool(self.svc.db.round_archive, round_)

    def _moved_on(self, round_: int) -> bool:
        return self.svc.read(lambda st: rounds.moved_on(st, round_))

    async def _promote(self, staging: str, final: str, size: Optional[int]) -> int:
        """HEAD the staging upload (exact size when given), then copy it to its final key."""
        svc = self.svc
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

    async def _unless_moved_on(self, round_: int, live: Callable[[], Awaitable[T]],
                               late: Callable[[], Awaitable[T]]) -> T:
        """`live()`, or `late()` when round `round_` is over (also if it ended during `live`)."""
        if self._moved_on(round_):
            return await late()
        try:
            return await live()
        except TransitionError as exc:  # the round may have moved on while we copied the object
            if exc.code == "not_merging" and self._moved_on(round_):
                return await late()
            raise

    async def upload(self, caller: str, req: msg.UploadRequest) -> msg.UploadGrant:
        """A presigned PUT to the caller's staging key for this round's upload."""
        run = self.run_cfg
        if req.size > run.max_state_bytes:
            raise TransitionError("oversized",
                                  f"size={req.size} exceeds max_state_bytes={run.max_state_bytes}")
        key = self.svc.read(lambda st: rounds.merge_upload_key(st, caller, req.round, req.kind,
                                                         req.sha256))
        expires = min(self.ttl, run.merge_timeout_seconds * 2)
        return msg.UploadGrant(put_url=self.svc.put_url(key, req.size, expires), key=key,
                               expires_at=time.time() + expires)

    async def pseudograd(self, caller: str, req: msg.PseudogradReport) -> msg.Ack:
        """Record an uploaded pseudo-gradient (a late one is checked against the archive)."""
        svc = self.svc

        async def live() -> msg.Ack:
            final = svc.read(lambda st: rounds.check_upload_key(st, caller, req.round,
                                                                "pseudograd", req.key, req.sha256))
            await self._promote(req.key, final, req.size)

            def tx(st: Any, now: float, rng: Any) -> None:
                rounds.maybe_freeze(st, now)
                rounds.report_pseudograd(st, caller, req.round, final, req.sha256, req.size, now)
            await svc.apply_async(tx)
            return msg.Ack()

        async def late() -> msg.Ack:
            rounds.check_archived_pseudograd(await self._archive(req.round), caller, req.round,
                                             req.key, req.sha256, req.size)
            return msg.Ack(message=f"already recorded for round {req.round}")
        return await self._unless_moved_on(req.round, live, late)

    async def _frozen_set(self, req: msg.StageRound) -> list:
        # read-only: the freeze comes with the reports and the bridge's clock, never with a GET
        return self.svc.read(lambda st: copy.deepcopy(rounds.merge_set(st, req.round, req.stage)))

    async def merge_set(self, caller: str, req: msg.StageRound) -> msg.MergeSet:
        """The frozen merge set of a stage's round (409 `not_frozen` before)."""
        items = await self._frozen_set(req)
        return msg.MergeSet(round=req.round, stage=req.stage, items=[self._item(i) for i in items])

    async def shard_plan(self, caller: str, req: msg.StageRound) -> msg.ShardPlan:
        """Which replicas merge which shard, from the frozen merge set."""
        run = self.run_cfg
        hotkeys = [i["hotkey"] for i in await self._frozen_set(req)]
        return msg.ShardPlan(round=req.round, stage=req.stage, shards=run.sync_shards,
                             mergers=assign_mergers(req.round, req.stage, hotkeys,
                                                    run.sync_shards, run.sync_mergers))

    async def merged(self, caller: str, req: msg.MergedReport) -> msg.MergedAck:
        """Record a merged-state vote; answers the published state once there is one."""
        svc = self.svc

        async def live() -> msg.MergedAck:
            final = svc.read(lambda st: rounds.check_upload_key(st, caller, req.round, "state",
                                                                req.key, req.sha256))
            size = svc.read(lambda st: votes.recorded_size(st, caller, req.sha256))
            if size is None:  # a repeat of a recorded vote (polling for publication) copies nothing
                size = await self._promote(req.key, final, None)

            def tx(st: Any, now: float, rng: Any) -> tuple:
                rounds.maybe_freeze(st, now)
                stage = st.miners[caller].stage if caller in st.miners else 0
                agreed = votes.report_merged(st, caller, req.round, req.sha256, final, size, now)
                return agreed, stage, copy.copy(st.stage_states[stage])
            agreed, stage, ss = await svc.apply_async(tx)
            ref = views.state_ref(stage, ss, svc.get_url, self.ttl) if agreed is not None else None
            return msg.MergedAck(published=agreed is not None, agreed=agreed, state=ref)
        return await self._unless_moved_on(req.round, live, lambda: self._late_merged(caller, req))

    async def _late_merged(self, caller: str, req: msg.MergedReport) -> msg.MergedAck:
        svc = self.svc
        arch = await self._archive(req.round + 1)
        stage, ss = svc.read(lambda st: rounds.published_state(
            st, caller, req.round, req.sha256, req.key, arch))
        own = await self._archive(req.round)
        if own is not None and votes.add_late_vote(own, caller, stage, req.sha256):
            # a vote that came after the run moved on is still evidence for the validators
            await svc.apply_async(lambda st, now, rng: st.archive_round(req.round, own))
        ref = views.state_ref(stage, ss, svc.get_url, self.ttl)
        return msg.MergedAck(published=True, agreed=ss.sha256 == req.sha256, state=ref)

    async def hoplog(self, caller: str, req: msg.HopLogQuery) -> msg.HopLog:
        """A round's done hops, published states, merge sets, votes and flags."""
        svc, ttl = self.svc, self.ttl
        hops = await run_in_threadpool(svc.db.done_hops, req.round, req.hotkey)
        arch = await self._archive(req.round) or {}
        states = [views.state_ref(s, StageState(**d), svc.get_url, ttl)
                  for s, d in enumerate(arch.get("states", []))]
        return msg.HopLog(round=req.round,
                          records=[views.hop_record(h, svc.get_url, ttl) for h in hops],
                          states=[s for s in states if s],
                          pseudograds=[self._item(p) for p in arch.get("pseudograds", [])],
                          votes=[msg.Vote(**v) for v in arch.get("votes", [])],
                          flagged=arch.get("flagged", []), unpaid=arch.get("unpaid", []))

    async def disputes(self, caller: str, req: None) -> integ.DisputeList:
        """Merge disputes awaiting a validator's arbitration."""
        open_ = self.svc.read(lambda st: copy.deepcopy(votes.open_disputes(st)))
        return integ.DisputeList(disputes=[integ.Dispute(
            round=d["round"], stage=d["stage"], deadline=d["deadline"],
            start=views.state_ref(d["stage"], d["start"], self.svc.get_url, self.ttl),
            items=[self._item(i) for i in d["items"]],
            votes=[integ.DisputeVote(hotkey=h, sha256=s) for h, s in d["votes"].items()])
            for d in open_])

    async def arbitrate(self, caller: str, req: integ.Arbitration) -> integ.ArbitrationAck:
        """A validator's replayed merge result for a dispute."""
        agreed = await self.svc.apply_async(lambda st, now, rng: votes.arbitrate(
            st, caller, req.round, req.stage, req.sha256, now))
        return integ.ArbitrationAck(agreed=agreed)

    async def verdicts(self, caller: str, req: integ.VerdictReport) -> integ.VerdictAck:
        """Audit verdicts; failed miners are quarantined (answers who, until which round)."""
        def tx(st: Any, now: float, rng: Any) -> dict:
            out = {}
            for v in req.verdicts:
                if v.hotkey not in st.miners:
                    continue  # deregistered since: nothing to quarantine
                until = quarantine.record_verdict(st, caller, req.round, v.hotkey, v.passed,
                                                  v.reason)
                if not v.passed and until > st.round:
                    out[v.hotkey] = until
            return out
        return integ.VerdictAck(quarantined=await self.svc.apply_async(tx))

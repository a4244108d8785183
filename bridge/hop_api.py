"""What the bridge does for each hop-phase route (register, lease, done, fail, step, metrics):
one method per route of `protocol.routes`, taking the caller and the request model and
returning the response model. No HTTP here; `bridge.web` does the transport."""
from __future__ import annotations

import copy
import time
from typing import Any, Optional

from starlette.concurrency import run_in_threadpool

from bridge import claims, state, views
from bridge.hop_outputs import look_at, seal
from bridge.longpoll import Waiters
from bridge.records import TransitionError
from bridge.service import BridgeService, seen_version
from protocol import messages as msg

__all__ = ["HopApi"]


class HopApi:
    """Hop routes over one `BridgeService`; `prom` counts done hops (or None)."""

    def __init__(self, svc: BridgeService, hotkey: str, netuid: Optional[int], ttl: float,
                 spec: Any, waiters: Waiters, prom: Any = None) -> None:
        self.svc, self.run_cfg, self.hotkey, self.netuid = svc, svc.run, hotkey, netuid
        self.ttl, self.spec, self.waiters, self.prom = ttl, spec, waiters, prom
        self.store = svc.storage if svc.check_objects else None
        self._sealing: set[str] = set()  # hops whose done is between seal and commit

    async def health(self, caller: None, req: None) -> msg.Health:
        """Unsigned liveness and the bridge hotkey."""
        return msg.Health(hotkey=self.hotkey, netuid=self.netuid)

    async def run(self, caller: str, req: None) -> msg.RunInfo:
        """The run config."""
        return msg.RunInfo(run=self.run_cfg, bridge_hotkey=self.hotkey)

    async def metrics(self, caller: str, req: None) -> msg.Metrics:
        """Counters, plus the database's commit counts."""
        svc = self.svc
        m = svc.read(lambda st: views.metrics(st, time.time()))
        return m.model_copy(update={"db_commits": svc.commits, "db_rows_written": svc.db.writes})

    async def register(self, caller: str, req: msg.RegisterRequest) -> msg.Assignment:
        """Assign (or re-assign) the caller a stage."""
        if req.protocol_version != msg.PROTOCOL_VERSION:
            raise TransitionError("bad_version", f"protocol_version must be "
                                  f"{msg.PROTOCOL_VERSION}, got {req.protocol_version}")

        def tx(st: Any, now: float, rng: Any) -> tuple:
            m = state.register(st, caller, now, rng, (req.device_class, req.compute_dtype), req.device_name)
            return copy.copy(m), st.round, st.phase, copy.copy(st.stage_states[m.stage])
        m, rnd, phase, ss = await self.svc.apply_async(tx)
        ref = views.state_ref(m.stage, ss, self.svc.get_url, self.ttl)
        return msg.Assignment(hotkey=caller, stage=m.stage, round=rnd, inner_step=m.inner_step,
                              phase=phase, state=ref, run=self.run_cfg)

    async def leave(self, caller: str, req: msg.LeaveRequest) -> msg.LeaveResponse:
        """Drop the caller; its queued hops move to other replicas."""
        moved = await self.svc.apply_async(lambda st, now, rng: state.leave(st, caller, now, rng))
        return msg.LeaveResponse(hops_moved=moved)

    async def lease(self, caller: str, req: msg.LeaseRequest) -> msg.LeaseResponse:
        """Hops for the caller, or what to do instead; parks up to `wait_ms` while it is `wait`."""
        def tx(st: Any, now: float, rng: Any) -> tuple:
            action, hops, retry = state.lease(st, caller, req.max_hops, req.fwd_out_bytes,
                                              req.bwd_out_bytes, now, rng, req.max_open_graphs)
            m = st.miners[caller]
            return (action, [copy.copy(h) for h in hops], retry, st.round, m.inner_step,
                    m.stage, st.stage_states[m.stage].sha256, m.step_samples)
        start = time.monotonic()
        end = start + req.wait_ms / 1000.0
        parked = 0.0
        while True:
            action, hops, retry, rnd, step, stage, sha, samples = await self.svc.apply_async(tx)
            left = end - time.monotonic()
            if action != "wait" or left <= 0.001:
                break
            t0 = time.monotonic()
            await self.waiters.wait(caller, stage, left, seen_version())  # no wake since is lost
            parked += time.monotonic() - t0
        if action == "wait" and req.wait_ms > 0:
            retry = 0.0  # the bridge already held the request: poll again at once
        svc = self.svc
        out = [views.hop_message(h, svc.get_url, svc.put_url, max(1.0, h.deadline - time.time()))
               for h in hops]
        return msg.LeaseResponse(action=action, hops=out, round=rnd, inner_step=step,
                                 stage=stage, state_sha=sha, step_samples=samples,
                                 retry_after=retry, parked_ms=int(parked * 1000))

    def _leased(self, caller: str, hop_id: str) -> Any:
        return self.svc.check(lambda st: copy.copy(state.check_done(st, caller, hop_id,
                                                                    time.time())))

    async def hop_done(self, caller: str, req: msg.HopDone) -> msg.Ack:
        """Seal the hop's upload at its final key, then record it done."""
        hop = self._leased(caller, req.hop_id)
        if hop.out_key is not None:
            if req.size != hop.out_size:
                raise TransitionError("bad_size", f"size={req.size}, the lease signed "
                                      f"{hop.out_size} bytes for {hop.out_key}")
            if req.hop_id in self._sealing:  # a second seal could copy other bytes under a commit
                raise TransitionError("in_progress", f"a done for hop {req.hop_id} is "
                                      "being applied; retry")
        self._sealing.add(req.hop_id)
        try:
            if self.store is not None and hop.out_key is not None:
                t0 = time.monotonic()
                await run_in_threadpool(seal, self.store, hop.out_key)
                if self.prom is not None:
                    self.prom.sealed(hop.stage, time.monotonic() - t0)
            await self.svc.apply_async(state.complete, caller, req.hop_id, req.sha256, req.size,
                                       req.loss)
        finally:
            self._sealing.discard(req.hop_id)
        if self.prom is not None:
            self.prom.hop_done(hop.stage, hop.kind, time.time() - hop.leased_at, req.size)
        return msg.Ack()

    async def hop_fail(self, caller: str, req: msg.HopFail) -> msg.Ack:
        """Release a hop; a claim about its inputs is judged by looking at them."""
        hop = self._leased(caller, req.hop_id)
        verdicts = []
        if req.reason != "other":
            for ref in claims.disputed_inputs(hop):
                verdicts.append(await run_in_threadpool(look_at, self.store, self.spec, ref))
        outcome = await self.svc.apply_async(claims.judge_claim, caller, req.hop_id, req.reason,
                                             req.detail, verdicts)
        return msg.Ack(message=f"hop {req.hop_id} released: {outcome}")

    async def step_done(self, caller: str, req: msg.StepDone) -> msg.StepAck:
        """Record the caller's optimizer step."""
        def tx(st: Any, now: float, rng: Any) -> int:
            return state.step_done(st, caller, req.round, req.inner_step, req.samples,
                                   now).inner_step
        return msg.StepAck(round=req.round, inner_step=await self.svc.apply_async(tx))

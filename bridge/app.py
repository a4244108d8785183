"""Thin FastAPI layer: auth, rate limit, body cap, validation, and one transition per route.

Handlers are async: a transition takes well under a millisecond, and running it on the event
loop avoids thread hand-offs under the GIL; only S3 HEADs and hop-log reads go to threads."""
from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge import rounds, state, views
from bridge.db import Database
from bridge.records import TransitionError
from bridge.service import BridgeService
from bridge.settings import BridgeSettings
from bridge.storage import Storage
from protocol import messages as msg
from protocol.auth import SqliteNonceStore, auth_dependency

__all__ = ["create_app", "Registry", "RateLimiter", "BodyCap"]

log = logging.getLogger(__name__)


class Registry:
    """Who may call: metagraph membership and validator permits, cached for `ttl` seconds."""

    def __init__(self, chain: Any, ttl: float = 5.0) -> None:
        self.chain, self.ttl = chain, ttl
        self._at, self._members, self._validators = -1e9, set(), set()
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return
            mg = self.chain.metagraph()
            self._members = {n.hotkey for n in mg.neurons}
            self._validators = {n.hotkey for n in mg.neurons if n.validator_permit}
            self._at = time.monotonic()

    def is_allowed(self, hotkey: str, role: str) -> bool:
        """Role "validator" needs a permit; every other role needs registration."""
        self._refresh()
        return hotkey in (self._validators if role == "validator" else self._members)


class RateLimiter:
    """Per-hotkey token bucket."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Take one token for `key`; False when the bucket is empty."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            return ok


def _err(status: int, code: str, message: str, retry_after: Optional[float] = None) -> JSONResponse:
    body = msg.ErrorBody(error=code, message=message[:2000], retry_after=retry_after)
    return JSONResponse(status_code=status, content=body.model_dump(exclude_none=True))


class BodyCap:
    """Pure ASGI middleware: 413 for bodies over `limit` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and (not v.isdigit() or int(v) > self.limit):
                return await self._reject(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            msg_ = await receive()
            seen += len(msg_.get("body", b""))
            if seen > self.limit:
                raise TransitionError(413, "body_too_large", f"request body over {self.limit} bytes")
            return msg_
        await self.app(scope, counted, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        resp = _err(413, "body_too_large", f"request body over {self.limit} bytes")
        await resp(scope, receive, send)


def create_app(settings: BridgeSettings, chain: Any, storage: Optional[Storage],
               keypair: Any, registry: Optional[Registry] = None) -> FastAPI:
    """Build the bridge app over a chain, a storage (None: URLs are not signed) and a keypair."""
    hotkey = keypair.ss58_address
    run = settings.run
    svc = BridgeService(run, Database(settings.db_path), storage, settings.tunables,
                        seed=settings.seed, check_objects=settings.check_objects)
    reg = registry or Registry(chain, settings.metagraph_ttl)
    nonces = SqliteNonceStore(settings.nonce_db_path)
    limiter = RateLimiter(settings.rate_per_second, settings.rate_burst)
    app = FastAPI(title="resbm bridge", version=msg.PROTOCOL_VERSION)
    app.state.service, app.state.registry = svc, reg
    app.add_middleware(BodyCap, limit=settings.max_body_bytes)

    def role(name: str) -> Any:
        auth = auth_dependency(hotkey, nonces, reg.is_allowed, role=name)

        async def dep(caller: str = Depends(auth)) -> str:
            if not limiter.allow(caller):
                raise TransitionError(429, "rate_limited", f"too many requests from {caller}")
            return caller
        return dep

    anyone, miner, validator = role("registered"), role("miner"), role("validator")

    @app.exception_handler(TransitionError)
    async def _te(_: Request, exc: TransitionError) -> JSONResponse:
        return _err(exc.status, exc.code, exc.message, 1.0 if exc.status in (409, 429) else None)

    @app.exception_handler(StarletteHTTPException)
    async def _he(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _err(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _ve(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}"
                 for e in exc.errors()[:5]]
        return _err(400, "bad_request", "; ".join(parts))

    ttl = settings.url_ttl

    async def _size(key: str) -> Optional[int]:
        if not svc.check_objects:
            return -1  # benchmark mode: no HEAD, no thread hop
        return await run_in_threadpool(svc.object_size, key)

    def remaining(deadline: float) -> float:
        return max(1.0, deadline - time.time())

    @app.get("/health")
    async def health() -> dict:
        return msg.Health(hotkey=hotkey).model_dump()

    @app.get("/v1/run")
    async def get_run(caller: str = Depends(anyone)) -> dict:
        return msg.RunInfo(run=run, bridge_hotkey=hotkey).model_dump()

    @app.post("/v1/miners/register")
    async def register(req: msg.RegisterRequest, caller: str = Depends(miner)) -> dict:
        if req.protocol_version != msg.PROTOCOL_VERSION:
            raise TransitionError(400, "bad_version", f"protocol_version must be "
                                  f"{msg.PROTOCOL_VERSION}, got {req.protocol_version}")

        def tx(st: Any, now: float, rng: Any) -> tuple:
            m = state.register(st, caller, now, rng)
            return copy.copy(m), st.round, st.phase, copy.copy(st.stage_states[m.stage])
        m, rnd, phase, ss = svc.apply(tx)
        return msg.Assignment(hotkey=caller, stage=m.stage, round=rnd, inner_step=m.inner_step,
                              phase=phase, state=views.state_ref(m.stage, ss, svc.get_url, ttl),
                              run=run).model_dump()

    @app.post("/v1/hops/lease")
    async def lease(req: msg.LeaseRequest, caller: str = Depends(miner)) -> dict:
        def tx(st: Any, now: float, rng: Any) -> tuple:
            action, hops, retry = state.lease(st, caller, req.max_hops, req.fwd_out_bytes,
                                              req.bwd_out_bytes, now, rng)
            m = st.miners[caller]
            return (action, [copy.copy(h) for h in hops], retry, st.round, m.inner_step,
                    m.stage, st.stage_states[m.stage].sha256, m.step_samples)
        action, hops, retry, rnd, step, stage, sha, samples = svc.apply(tx)
        out = [views.hop_message(h, svc.get_url, svc.put_url, remaining(h.deadline)) for h in hops]
        return msg.LeaseResponse(action=action, hops=out, round=rnd, inner_step=step, stage=stage,
                                 state_sha=sha, step_samples=samples,
                                 retry_after=retry).model_dump()

    @app.post("/v1/hops/done")
    async def hop_done(req: msg.HopDone, caller: str = Depends(miner)) -> dict:
        hop = svc.read(lambda st: copy.copy(state.check_done(st, caller, req.hop_id, time.time())))
        if hop.out_key is not None:
            if req.size != hop.out_size:
                raise TransitionError(400, "bad_size", f"size={req.size}, the lease signed "
                                      f"{hop.out_size} bytes for {hop.out_key}")
            have = await _size(hop.out_key)
            if have is None:
                raise TransitionError(400, "missing_object", f"no object at {hop.out_key}")
            if have >= 0 and have != hop.out_size:
                raise TransitionError(400, "bad_size", f"object {hop.out_key} has {have} bytes, "
                                      f"expected {hop.out_size}")
        svc.apply(state.complete, caller, req.hop_id, req.sha256, req.size, req.loss)
        return msg.Ack().model_dump()

    @app.post("/v1/hops/fail")
    async def hop_fail(req: msg.HopFail, caller: str = Depends(miner)) -> dict:
        svc.apply(state.fail, caller, req.hop_id, req.reason, req.detail)
        return msg.Ack(message=f"hop {req.hop_id} released").model_dump()

    @app.post("/v1/steps/done")
    async def step_done(req: msg.StepDone, caller: str = Depends(miner)) -> dict:
        def tx(st: Any, now: float, rng: Any) -> tuple:
            m = state.step_done(st, caller, req.round, req.inner_step, req.samples, now)
            return m.inner_step
        return msg.StepAck(round=req.round, inner_step=svc.apply(tx)).model_dump()

    @app.post("/v1/rounds/upload")
    async def upload(req: msg.UploadRequest, caller: str = Depends(miner)) -> dict:
        if req.size > run.max_state_bytes:
            raise TransitionError(400, "oversized",
                                  f"size={req.size} exceeds max_state_bytes={run.max_state_bytes}")
        key = svc.read(lambda st: rounds.upload_key(st, caller, req.round, req.kind, req.sha256))
        expires = min(ttl, run.merge_timeout_seconds * 2)
        return msg.UploadGrant(put_url=svc.put_url(key, req.size, expires), key=key,
                               expires_at=time.time() + expires).model_dump()

    async def _head_exact(key: str, size: Optional[int]) -> int:
        have = await _size(key)
        if have is None:
            raise TransitionError(400, "missing_object", f"no object at {key}")
        if size is not None and have >= 0 and have != size:
            raise TransitionError(400, "bad_size", f"object {key} has {have} bytes, not {size}")
        return max(have, 0)

    @app.post("/v1/rounds/pseudograd")
    async def pseudograd(req: msg.PseudogradReport, caller: str = Depends(miner)) -> dict:
        await _head_exact(req.key, req.size)

        def tx(st: Any, now: float, rng: Any) -> None:
            state.tick(st, now, rng)
            rounds.report_pseudograd(st, caller, req.round, req.key, req.sha256, req.size,
                                     req.samples, now)
        svc.apply(tx)
        return msg.Ack().model_dump()

    @app.get("/v1/rounds/{round_}/stages/{stage}/pseudograds")
    async def merge_set(round_: int, stage: int, caller: str = Depends(miner)) -> dict:
        def tx(st: Any, now: float, rng: Any) -> list:
            state.tick(st, now, rng)
            return rounds.merge_set(st, round_, stage)
        items = svc.apply(tx)
        return msg.MergeSet(round=round_, stage=stage, items=[
            msg.MergeItem(hotkey=i["hotkey"], key=i["key"], sha256=i["sha256"], size=i["size"],
                          samples=i["samples"], get_url=svc.get_url(i["key"], ttl))
            for i in items]).model_dump()

    @app.post("/v1/rounds/merged")
    async def merged(req: msg.MergedReport, caller: str = Depends(miner)) -> dict:
        size = await _head_exact(req.key, None)

        def tx(st: Any, now: float, rng: Any) -> tuple:
            stage = st.miners[caller].stage if caller in st.miners else 0
            agreed = rounds.report_merged(st, caller, req.round, req.sha256, req.key, size, now)
            return agreed, stage, copy.copy(st.stage_states[stage])
        agreed, stage, ss = svc.apply(tx)
        ref = views.state_ref(stage, ss, svc.get_url, ttl) if agreed is not None else None
        return msg.MergedAck(published=agreed is not None, agreed=agreed, state=ref).model_dump()

    @app.get("/v1/metrics")
    async def get_metrics(caller: str = Depends(anyone)) -> dict:
        return svc.read(lambda st: views.metrics(st, time.time())).model_dump()

    @app.get("/v1/validator/hoplog")
    async def hoplog(round: int, hotkey: Optional[str] = None,
               caller: str = Depends(validator)) -> dict:
        if round < 0:
            raise TransitionError(400, "bad_request", "round must be >= 0")
        hops = await run_in_threadpool(svc.db.done_hops, round, hotkey)
        recs = [views.hop_record(h, svc.get_url, ttl) for h in hops]
        arch = svc.db.round_archive(round) or {}
        from bridge.records import StageState
        states = [views.state_ref(s, StageState(**d), svc.get_url, ttl)
                  for s, d in enumerate(arch.get("states", []))]
        pgs = [msg.MergeItem(hotkey=p["hotkey"], key=p["key"], sha256=p["sha256"],
                             size=p["size"], samples=p["samples"],
                             get_url=svc.get_url(p["key"], ttl))
               for p in arch.get("pseudograds", [])]
        return msg.HopLog(round=round, records=recs, states=[s for s in states if s],
                          pseudograds=pgs, flagged=arch.get("flagged", [])).model_dump()

    return app

"""Thin FastAPI layer: auth, rate limit, body cap, validation, and one transition per route.

Handlers are async: a transition takes well under a millisecond, and running it on the event
loop avoids thread hand-offs under the GIL; only S3 HEADs and hop-log reads go to threads.
Transitions of one loop iteration share a SQLite commit (`BridgeService.apply_async`); a lease
with `wait_ms` parks until work for the miner appears (`bridge.longpoll`)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge import claims, state, views
from bridge.codespec import code_spec
from bridge.dataset import add_dataset_route, fetch_manifest
from bridge.dashboard import add_console_routes
from bridge.db import Database
from bridge.durable import DurableNonces, note_nonce
from bridge.fastpath import FastPath, error_response
from bridge.hop_outputs import look_at, seal
from bridge.longpoll import Waiters
from bridge.merge_routes import add_merge_routes
from bridge.shard_routes import add_shard_routes
from bridge.nonces import BufferedNonceStore
from bridge.records import TransitionError
from bridge.service import BridgeService
from bridge.settings import BridgeSettings
from bridge.storage import Storage
from protocol import messages as msg
from protocol.auth import AuthFailed, request_target, verify_request

__all__ = ["create_app", "Registry", "RateLimiter", "BodyCap"]

log = logging.getLogger(__name__)


class Registry:
    """Who may call: metagraph membership and validator permits, refreshed every `ttl` seconds by
    a background thread so a slow chain never stalls the event loop (requests read the last
    snapshot; a failed fetch keeps it and is logged)."""

    def __init__(self, chain: Any, ttl: float = 5.0, background: bool = True) -> None:
        self.chain, self.ttl = chain, ttl
        self._members: frozenset[str] = frozenset()
        self._validators: frozenset[str] = frozenset()
        self.refreshes = 0
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.refresh()
        if background:
            threading.Thread(target=self._loop, daemon=True, name="metagraph").start()

    def refresh(self) -> None:
        """Fetch the metagraph once and swap in the new snapshot."""
        mg = self.chain.metagraph()
        self._members = frozenset(n.hotkey for n in mg.neurons)
        self._validators = frozenset(n.hotkey for n in mg.neurons if n.validator_permit)
        self.refreshes += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.ttl)
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep serving from the last snapshot
                log.warning("metagraph refresh failed (keeping the last snapshot): %s", exc)
            self._stop.wait(min(1.0, self.ttl))  # kicks by unknown callers: at most one per second

    def close(self) -> None:
        """Stop the refresh thread."""
        self._stop.set()
        self._kick.set()

    def is_allowed(self, hotkey: str, role: str) -> bool:
        """Role "validator" needs a permit; every other role needs registration (never blocks)."""
        ok = hotkey in (self._validators if role == "validator" else self._members)
        if not ok:
            self._kick.set()  # maybe registered since the last snapshot: refresh soon
        return ok


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


_err = error_response


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


def _json(model: Any) -> Response:
    """A response from a message model, serialised once (no re-encoding by FastAPI)."""
    return Response(content=model.model_dump_json(), media_type="application/json")


def create_app(settings: BridgeSettings, chain: Any, storage: Optional[Storage],
               keypair: Any, registry: Optional[Registry] = None) -> FastAPI:
    """Build the bridge app over a chain, a storage (None: URLs are not signed) and a keypair."""
    hotkey = keypair.ss58_address
    run = settings.run
    spec = code_spec(run)  # ValueError naming the field when run.model is not a valid model
    tun = dataclasses.replace(settings.tunables, code_bytes=spec.nbytes)
    manifest = fetch_manifest(run, storage)  # refuses a dataset that disagrees with the model
    svc = BridgeService(run, Database(settings.db_path, settings.keep_rounds), storage, tun,
                        seed=settings.seed, check_objects=settings.check_objects)
    store = storage if svc.check_objects else None
    reg = registry or Registry(chain, settings.metagraph_ttl)
    nonces = BufferedNonceStore(settings.nonce_db_path)
    svc.nonces = nonces
    waiters = Waiters()
    svc.on_wake = waiters.wake
    limiter = RateLimiter(settings.rate_per_second, settings.rate_burst)
    # FastAPI's built-in OpenTelemetry hooks cost ~5% of a request even with no provider set
    app = FastAPI(title="resbm bridge", version=msg.PROTOCOL_VERSION,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.service, app.state.registry, app.state.waiters = svc, reg, waiters
    app.add_middleware(BodyCap, limit=settings.max_body_bytes)

    def authenticate(headers: Any, body: bytes, method: str, target: str, name: str) -> str:
        """Signature, nonce, registration/permit and rate limit; the caller's hotkey."""
        try:
            caller = verify_request(headers, body, method=method, path=target,
                                    receiver_ss58=hotkey, nonce_store=nonces)
        except AuthFailed as exc:
            log.info("auth rejected %s %s: %s", method, target, exc)
            raise StarletteHTTPException(exc.status_code, detail=str(exc)) from None
        note_nonce(nonces.stored)  # answered only once this nonce is on disk
        if not reg.is_allowed(caller, name):
            raise StarletteHTTPException(403, detail=f"not_allowed: hotkey {caller} may not "
                                         f"use {name} routes (unregistered, or no validator "
                                         "permit)")
        if name == "miner" and reg.is_allowed(caller, "validator"):
            raise StarletteHTTPException(403, detail=f"validator_hotkey: hotkey {caller} holds a "
                                         "validator permit and may not serve as a miner; mine "
                                         "with a hotkey that has no validator permit")
        if not limiter.allow(caller):
            raise TransitionError(429, "rate_limited", f"too many requests from {caller}")
        return caller

    def role(name: str) -> Any:
        """One dependency per role."""
        async def dep(request: Request) -> str:
            return authenticate(request.headers, await request.body(), request.method,
                                request_target(request.scope), name)
        return dep

    def miner_auth(headers: Any, body: bytes, method: str, target: str) -> str:
        return authenticate(headers, body, method, target, "miner")

    anyone, miner, validator = role("registered"), role("miner"), role("validator")
    prom = add_console_routes(app, svc, run, settings.db_path + ".console.json", validator,
                              lambda: reg.chain.metagraph().owner_hotkey)

    @app.exception_handler(TransitionError)
    async def _te(_: Request, exc: TransitionError) -> Response:
        return _err(exc.status, exc.code, exc.message, 1.0 if exc.status in (409, 429) else None)

    @app.exception_handler(StarletteHTTPException)
    async def _he(_: Request, exc: StarletteHTTPException) -> Response:
        return _err(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _ve(_: Request, exc: RequestValidationError) -> Response:
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}"
                 for e in exc.errors()[:5]]
        return _err(400, "bad_request", "; ".join(parts))

    ttl = settings.url_ttl

    def remaining(deadline: float) -> float:
        return max(1.0, deadline - time.time())

    add_dataset_route(app, run, storage, manifest, ttl)

    @app.get("/health")
    async def health() -> Response:
        return _json(msg.Health(hotkey=hotkey, netuid=settings.netuid))

    @app.get("/v1/run")
    async def get_run(caller: str = Depends(anyone)) -> Response:
        return _json(msg.RunInfo(run=run, bridge_hotkey=hotkey))

    @app.post("/v1/miners/register")
    async def register(req: msg.RegisterRequest, caller: str = Depends(miner)) -> Response:
        if req.protocol_version != msg.PROTOCOL_VERSION:
            raise TransitionError(400, "bad_version", f"protocol_version must be "
                                  f"{msg.PROTOCOL_VERSION}, got {req.protocol_version}")

        def tx(st: Any, now: float, rng: Any) -> tuple:
            m = state.register(st, caller, now, rng, (req.device_class, req.compute_dtype))
            return copy.copy(m), st.round, st.phase, copy.copy(st.stage_states[m.stage])
        m, rnd, phase, ss = await svc.apply_async(tx)
        return _json(msg.Assignment(hotkey=caller, stage=m.stage, round=rnd,
                                    inner_step=m.inner_step, phase=phase,
                                    state=views.state_ref(m.stage, ss, svc.get_url, ttl), run=run))

    @app.post("/v1/miners/leave")
    async def leave(req: msg.LeaveRequest, caller: str = Depends(miner)) -> Response:
        moved = await svc.apply_async(lambda st, now, rng: state.leave(st, caller, now, rng))
        return _json(msg.LeaveResponse(hops_moved=moved))

    @app.post("/v1/hops/lease")
    async def lease(req: msg.LeaseRequest, caller: str = Depends(miner)) -> Response:
        def tx(st: Any, now: float, rng: Any) -> tuple:
            action, hops, retry = state.lease(st, caller, req.max_hops, req.fwd_out_bytes,
                                              req.bwd_out_bytes, now, rng)
            m = st.miners[caller]
            return (action, [copy.copy(h) for h in hops], retry, st.round, m.inner_step,
                    m.stage, st.stage_states[m.stage].sha256, m.step_samples)
        end = time.monotonic() + req.wait_ms / 1000.0
        while True:
            action, hops, retry, rnd, step, stage, sha, samples = await svc.apply_async(tx)
            left = end - time.monotonic()
            if action != "wait" or left <= 0.001:
                break
            await waiters.wait(caller, stage, left)  # registered before any other task runs
        if action == "wait" and req.wait_ms > 0:
            retry = 0.0  # the bridge already held the request: poll again at once
        out = [views.hop_message(h, svc.get_url, svc.put_url, remaining(h.deadline)) for h in hops]
        return _json(msg.LeaseResponse(action=action, hops=out, round=rnd, inner_step=step,
                                       stage=stage, state_sha=sha, step_samples=samples,
                                       retry_after=retry))

    sealing: set[str] = set()  # hops whose done is between seal and commit

    @app.post("/v1/hops/done")
    async def hop_done(req: msg.HopDone, caller: str = Depends(miner)) -> Response:
        hop = svc.read(lambda st: copy.copy(state.check_done(st, caller, req.hop_id, time.time())))
        if hop.out_key is not None:
            if req.size != hop.out_size:
                raise TransitionError(400, "bad_size", f"size={req.size}, the lease signed "
                                      f"{hop.out_size} bytes for {hop.out_key}")
            if req.hop_id in sealing:  # a second seal could copy other bytes under a commit
                raise TransitionError(409, "in_progress", f"a done for hop {req.hop_id} is "
                                      "being applied; retry")
        sealing.add(req.hop_id)
        try:
            if store is not None and hop.out_key is not None:
                await run_in_threadpool(seal, store, hop.out_key)
            await svc.apply_async(state.complete, caller, req.hop_id, req.sha256, req.size,
                                  req.loss)
        finally:
            sealing.discard(req.hop_id)
        prom.hop_done(hop.stage, hop.kind, time.time() - hop.leased_at, req.size)
        return _json(msg.Ack())

    @app.post("/v1/hops/fail")
    async def hop_fail(req: msg.HopFail, caller: str = Depends(miner)) -> Response:
        hop = svc.read(lambda st: copy.copy(state.check_done(st, caller, req.hop_id, time.time())))
        verdicts = []
        if req.reason != "other":
            for ref in claims.disputed_inputs(hop):
                verdicts.append(await run_in_threadpool(look_at, store, spec, ref))
        outcome = await svc.apply_async(claims.judge_claim, caller, req.hop_id, req.reason,
                                        req.detail, verdicts)
        return _json(msg.Ack(message=f"hop {req.hop_id} released: {outcome}"))

    @app.post("/v1/steps/done")
    async def step_done(req: msg.StepDone, caller: str = Depends(miner)) -> Response:
        def tx(st: Any, now: float, rng: Any) -> int:
            return state.step_done(st, caller, req.round, req.inner_step, req.samples,
                                   now).inner_step
        return _json(msg.StepAck(round=req.round, inner_step=await svc.apply_async(tx)))

    @app.get("/v1/metrics")
    async def get_metrics(caller: str = Depends(anyone)) -> Response:
        m = svc.read(lambda st: views.metrics(st, time.time()))
        return _json(m.model_copy(update={"db_commits": svc.commits,
                                          "db_rows_written": svc.db.writes}))

    add_merge_routes(app, svc, ttl, miner, validator)
    add_shard_routes(app, svc, ttl, miner, validator, anyone)

    app.add_middleware(FastPath, limit=settings.max_body_bytes, routes={
        "/v1/hops/lease": (msg.LeaseRequest, miner_auth, lease),
        "/v1/hops/done": (msg.HopDone, miner_auth, hop_done)})
    app.add_middleware(DurableNonces, wait=svc.nonces_durable)
    return app

"""The bridge app: builds the service and its collaborators, then registers every route of
`protocol.routes.ROUTES` with its handler (`bridge.hop_api`, `bridge.merge_api`, the console and
the dataset) through `bridge.web`; the hot routes also get the ASGI fast path.

Handlers are async: a transition takes well under a millisecond, and running it on the event
loop avoids thread hand-offs under the GIL; only S3 HEADs and hop-log reads go to threads.
Transitions of one loop iteration share a SQLite commit (`BridgeService.apply_async`); a lease
with `wait_ms` parks until work for the miner appears (`bridge.longpoll`)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge.auth import Authenticator, RateLimiter, Registry, UnknownKeyBudget
from bridge.codespec import code_spec
from bridge.dashboard import console_handlers
from bridge.dataset import dataset_handler, fetch_manifest
from bridge.db import open_database
from bridge.durable import DurableNonces
from bridge.fastpath import FastPath
from bridge.hop_api import HopApi
from bridge.longpoll import Waiters
from bridge.merge_api import MergeApi
from bridge.shard_api import ShardApi
from bridge.nonces import BufferedNonceStore
from bridge.service import BridgeService
from bridge.settings import BridgeSettings
from bridge.storage import Storage
from bridge.syncspec import sync_spec
from bridge.web import BodyCap, error_response_for, mount
from protocol import messages as msg
from protocol.routes import ROUTES

__all__ = ["create_app"]


def create_app(settings: BridgeSettings, chain: Any, storage: Optional[Storage],
               keypair: Any, registry: Optional[Registry] = None) -> FastAPI:
    """Build the bridge app over a chain, a storage (None: URLs are not signed) and a keypair."""
    hotkey, run, ttl = keypair.ss58_address, settings.run, settings.url_ttl
    spec = code_spec(run)  # ValueError naming the field when run.model is not a valid model
    tun = dataclasses.replace(settings.tunables, code_bytes=spec.nbytes, sync=sync_spec(run))
    manifest = fetch_manifest(run, storage)  # refuses a dataset that disagrees with the model
    db, waiters = open_database(settings.db_path, settings.keep_rounds), Waiters()
    if db.shared:  # PostgreSQL: nonces and rates are settled in the state's transactions
        from bridge.pg_nonces import PgNonceStore
        # The transaction thread holds the run's lock for every bridge process: let it have
        # the GIL back within 1 ms of each database answer, not the default 5 ms.
        sys.setswitchinterval(0.001)
        nonces: Any = PgNonceStore(db.pool, rate=settings.rate_per_second,
                                   burst=settings.rate_burst)
    else:
        nonces = BufferedNonceStore(settings.nonce_db_path)
    svc = BridgeService(run, db, storage, tun, seed=settings.seed,
                        check_objects=settings.check_objects, nonces=nonces, on_wake=waiters.wake)
    reg = registry or Registry(chain, settings.metagraph_ttl)
    auth = Authenticator(hotkey, reg, nonces,
                         RateLimiter(settings.rate_per_second, settings.rate_burst),
                         UnknownKeyBudget(settings.unknown_rate))
    console, prom = console_handlers(svc, run, settings.db_path + ".console.json",
                                     lambda: reg.chain.metagraph().owner_hotkey, ttl, lambda: auth.heard,
                                     docs=db if db.shared else None, auth_counts=auth.counts)
    hops = HopApi(svc, hotkey, settings.netuid, ttl, spec, waiters, prom)
    merge, shards = MergeApi(svc, ttl), ShardApi(svc, ttl)
    handlers = {**console, "dataset_file": dataset_handler(run, storage, manifest, ttl)}
    for r in ROUTES:
        handlers.setdefault(r.name, getattr(hops, r.name, None) or getattr(merge, r.name, None)
                            or getattr(shards, r.name, None))

    # FastAPI's built-in OpenTelemetry hooks cost ~5% of a request even with no provider set
    app = FastAPI(title="resbm bridge", version=msg.PROTOCOL_VERSION,
                  telemetry={"tracing": False, "metrics": False, "logs": False},
                  lifespan=_listening(db, waiters))
    app.state.service, app.state.registry, app.state.waiters = svc, reg, waiters

    @app.exception_handler(StarletteHTTPException)
    async def _error(_: Request, exc: Exception) -> Response:  # 404/405 from routing
        return error_response_for(exc)

    endpoints = mount(app, ROUTES, handlers, auth)
    app.add_middleware(BodyCap, limit=settings.max_body_bytes)
    app.add_middleware(FastPath, endpoints=endpoints, limit=settings.max_body_bytes)
    app.add_middleware(DurableNonces, wait=svc.nonces_durable, refuse=error_response_for)
    return app


def _listening(db: Any, waiters: Waiters) -> Any:
    """The app's lifespan: with a shared database, wake this process's long-polls for work
    that other bridge processes create (LISTEN/NOTIFY) while the app serves."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        listener = None
        if db.shared:
            from bridge.pg_notify import WakeListener
            loop = asyncio.get_running_loop()
            listener = WakeListener(db.url, db.channel, db.origin, lambda t, a, v:
                                    loop.call_soon_threadsafe(waiters.wake, t, a, v))
            listener.start()
            await asyncio.to_thread(listener.ready.wait, 10.0)
        app.state.listener = listener
        try:
            yield
        finally:
            if listener is not None:
                listener.stop()
    return lifespan

"""The bridge app: builds the service and its collaborators, then registers every route of
`protocol.routes.ROUTES` with its handler, named in one table (`route_handlers`: `bridge.hop_api`,
`bridge.merge_api`, `bridge.shard_api`, the console and the dataset), through `bridge.web`; the hot routes also get the ASGI fast path.

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
from bridge.clock import ticking
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
from bridge.web import BodyCap, Handler, error_response_for, mount
from protocol import messages as msg
from protocol.routes import ROUTES

__all__ = ["create_app", "route_handlers"]


def route_handlers(hops: HopApi, merge: MergeApi, shards: ShardApi, console: dict[str, Handler],
                   dataset_file: Handler) -> dict[str, Handler]:
    """Route name (`protocol.routes.ROUTES`) -> its handler: every route the bridge serves, in one table."""
    return {
        # public and registered reads
        "health": hops.health, "run": hops.run, "metrics": hops.metrics, "dataset_file": dataset_file,
        # the console (bridge.dashboard): dashboard_page, dashboard, prometheus, model,
        # validator_report, validation_loss
        **console,
        # miners: membership and hops
        "register": hops.register, "leave": hops.leave, "lease": hops.lease, "hop_done": hops.hop_done,
        "hop_fail": hops.hop_fail, "step_done": hops.step_done,
        # the whole-state round sync and the validators' hop checks
        "upload": merge.upload, "pseudograd": merge.pseudograd, "merge_set": merge.merge_set,
        "shard_plan": merge.shard_plan, "merged": merge.merged, "hoplog": merge.hoplog,
        "disputes": merge.disputes, "arbitrate": merge.arbitrate, "verdicts": merge.verdicts,
        # the sharded sync
        "sync_upload": shards.sync_upload, "sync_pseudograd": shards.sync_pseudograd,
        "sync_view": shards.sync_view, "sync_votes": shards.sync_votes, "sync_disputes": shards.sync_disputes,
        "sync_arbitrate": shards.sync_arbitrate,
    }


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
    handlers = route_handlers(hops, merge, shards, console, dataset_handler(run, storage, manifest, ttl))

    # FastAPI's built-in OpenTelemetry hooks cost ~5% of a request even with no provider set
    app = FastAPI(title="resbm bridge", version=msg.PROTOCOL_VERSION,
                  telemetry={"tracing": False, "metrics": False, "logs": False},
                  lifespan=_listening(db, waiters, svc, settings.tick_seconds))
    app.state.service, app.state.registry, app.state.waiters = svc, reg, waiters

    @app.exception_handler(StarletteHTTPException)
    async def _error(_: Request, exc: Exception) -> Response:  # 404/405 from routing
        return error_response_for(exc)

    endpoints = mount(app, ROUTES, handlers, auth)
    app.add_middleware(BodyCap, limit=settings.max_body_bytes)
    app.add_middleware(FastPath, endpoints=endpoints, limit=settings.max_body_bytes)
    app.add_middleware(DurableNonces, wait=svc.nonces_durable, refuse=error_response_for)
    return app


def _listening(db: Any, waiters: Waiters, svc: BridgeService, tick_seconds: float) -> Any:
    """The app's lifespan: the clock ticks (`bridge.clock`); with a shared database, wake this
    process's long-polls for work that other bridge processes create (LISTEN/NOTIFY)."""
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
            async with ticking(svc, tick_seconds):
                yield
        finally:
            if listener is not None:
                listener.stop()
    return lifespan

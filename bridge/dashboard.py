"""The owner's read-only dashboard: `GET /` (a static page), `GET /v1/dashboard` (its JSON),
`GET /metrics` (Prometheus), `POST /v1/validator/report` (validators publish verdicts/weights),
and the published model's routes (`bridge.model_api`: `GET /v1/model`, validators' held-out loss).

The page polls the JSON every few seconds. Nothing secret is on it: hotkeys, counters, losses
and the weights validators set (which are public on chain anyway). Unsigned routes are cached
for a second so that scraping or many open tabs cost the bridge next to nothing.

Every figure means what its label says: a miner's status is whether the bridge hears from it
(any signed request counts) and whether it is quarantined; its health is the routing health
(1 = no recent failures), coloured by its own value; a stage counts its replicas by status.
"""
from __future__ import annotations

import json
import time
from importlib import resources
from collections.abc import Mapping
from typing import Any, Callable, Optional

from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from bridge.console_store import ConsoleStore, validation_figure
from bridge.dashboard_history import RoundHistory
from bridge.model_api import ModelApi
from bridge.prometheus import CONTENT_TYPE, BridgeMetrics
from protocol.console import ValidatorReport
from protocol.lifecycle import Phase
from protocol.messages import Ack, Metrics, RunConfig

__all__ = ["dashboard_state", "miner_status", "validation_curve", "wire_bytes", "console_handlers",
           "CACHE_SECONDS", "HEALTH_GOOD", "HEALTH_POOR"]

CACHE_SECONDS = 1.0
HEALTH_GOOD, HEALTH_POOR = 0.8, 0.5  # routing health at or above GOOD shows green, below POOR red


def wire_bytes(m: Metrics, run: RunConfig) -> dict[str, Any]:
    """Boundary bytes moved against the same hops' activations sent uncompressed in bf16."""
    d, t = run.model.get("d_model"), run.model.get("seq_len")
    moved = sum(s.bytes_moved for s in m.stages)
    objects = max(0, sum(s.hops_done for s in m.stages) - m.completed_total)  # stage-0 bwd uploads nothing
    raw = objects * run.batch_size * int(t) * int(d) * 2 if d and t else None
    return {"moved": moved, "uncompressed": raw,
            "ratio": (raw / moved) if raw and moved else None}


def _latest_weights(console: dict[str, Any]) -> tuple[dict[str, float], str | None]:
    """Weights of the validator that set them most recently."""
    best = None
    for vhk, v in console["validators"].items():
        if v.get("weights") is not None and (best is None or v["weights_at"] > best[1]["weights_at"]):
            best = (vhk, v)
    return (best[1]["weights"], best[0]) if best else ({}, None)


def _latest_scores(console: dict[str, Any]) -> dict[str, float]:
    latest = max(console["validators"].values(), key=lambda v: v.get("at", 0), default=None)
    return dict(latest["scores"]) if latest else {}


def miner_status(presence: Optional[dict[str, Any]], heard_at: Optional[float], now: float,
                 timeout: float) -> tuple[str, str]:
    """(status, detail): `left` (unregistered), `quarantined` (a validator failed it), `probation`
    (failed, but the only live replicas of its stage: it trains unpaid), `offline`
    (nothing heard within the health timeout) or `online`."""
    if presence is None or not presence["active"]:
        return "left", "left the run"
    if presence["quarantined_until"] is not None:
        return "quarantined", f"until round {presence['quarantined_until']}"
    if presence.get("probation_until") is not None:
        return "probation", (f"failed an audit; trains its stage unpaid until round {presence['probation_until']} "
                             "(no live replica of the stage is in good standing)")
    silent = now - max(presence["last_seen"], heard_at or 0.0)
    if silent > timeout:
        return "offline", f"silent {silent:.0f}s"
    return "online", f"heard {max(0.0, silent):.0f}s ago"


def validation_curve(console: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round, the median of validators' held-out losses of its model, oldest first."""
    out = []
    for r, reports in sorted(console.get("validation", {}).items(), key=lambda kv: int(kv[0])):
        fig = validation_figure(reports)
        if fig is not None:
            out.append({"round": int(r), **fig})
    return out


def _health_class(health: float) -> str:
    return "ok" if health >= HEALTH_GOOD else "bad" if health < HEALTH_POOR else "warn"


def dashboard_state(m: Metrics, run: RunConfig, rounds: list[dict[str, Any]],
                    console: dict[str, Any], owner_hotkey: str | None, now: float,
                    presence: Optional[dict[str, dict[str, Any]]] = None,
                    heard: Optional[dict[str, float]] = None,
                    health_timeout: float = 120.0) -> dict[str, Any]:
    """Everything the page shows, as one JSON-able dict (pure)."""
    weights, weights_by = _latest_weights(console)
    scores = _latest_scores(console)
    last = rounds[-1]["miners"] if rounds else {}
    presence, heard = presence or {}, heard or {}
    miners = []
    for mm in m.miners:
        a = console["audits"].get(mm.hotkey, {})
        status, detail = miner_status(presence.get(mm.hotkey), heard.get(mm.hotkey), now, health_timeout)
        miners.append({
            "hotkey": mm.hotkey, "stage": mm.stage, "status": status, "status_detail": detail,
            "health": mm.health, "health_class": _health_class(mm.health), "failures": mm.failures,
            "hops": mm.hops_done, "hops_per_s": mm.throughput, "lease_expiries": mm.lease_expiries,
            "compute_fraction": last.get(mm.hotkey, {}).get("compute_fraction"),
            "audits_passed": a.get("passed", 0), "audits_failed": a.get("failed", 0),
            "last_audit": None if "last_round" not in a else {
                "round": a["last_round"], "passed": a["last_passed"], "reason": a["last_reason"]},
            "score": scores.get(mm.hotkey), "standing": mm.standing,
            "quarantined_until": mm.quarantined_until,
            # once weights are published, a miner left out of them has weight 0
            "weight": weights.get(mm.hotkey, 0.0) if weights_by else None})
    stages = [{"stage": s.stage, "replicas": s.replicas,
               "online": sum(1 for x in miners if x["stage"] == s.stage and x["status"] in ("online", "probation")),
               "quarantined": sum(1 for x in miners if x["stage"] == s.stage and x["status"] == "quarantined"),
               "hops": s.hops_done, "bytes": s.bytes_moved,
               "state_after_round": s.published_round - 1 if s.published_round >= 1 else None,
               "miners": [mm.hotkey for mm in m.miners if mm.stage == s.stage],
               "probation": [mm.hotkey for mm in m.miners if mm.stage == s.stage and mm.standing == "probation"]}
              for s in m.stages]
    recent = m.recent_losses[-32:]
    return {
        "generated_at": now, "run_id": m.run_id, "phase": m.phase, "round": m.round,
        "total_rounds": run.total_rounds, "n_stages": run.n_stages,
        "progress": {"total": m.samples_total, "completed": m.samples_completed,
                     "abandoned": m.samples_abandoned},
        "samples": {"completed": m.completed_total, "abandoned": m.abandoned_total,
                    "abandon_reasons": dict(sorted(m.abandon_reasons.items()))},
        "stages": stages, "miners": miners, "bytes": wire_bytes(m, run),
        "loss_curve": [{"round": r["round"], "loss": r["loss"]} for r in rounds if r["loss"] is not None],
        "val_curve": validation_curve(console),
        "val_tokens": run.val_tokens,
        "recent_loss": {"mean": sum(recent) / len(recent), "hops": len(recent)} if recent else None,
        "owner": {"hotkey": owner_hotkey, "weight": weights.get(owner_hotkey) if owner_hotkey else None},
        "weights_by": weights_by,
        "verdicts": list(reversed(console["verdicts"][-20:])),
        "incentives": run.incentives.model_dump(),
        "empty_rounds": m.empty_rounds, "alerts": alerts(m, run, console),
    }


def alerts(m: Metrics, run: RunConfig, console: dict[str, Any] | None = None) -> list[str]:
    """What the owner must see at once: stages kept alive by a failed replica, rounds that trained
    nothing, audits no calibration covers."""
    out = []
    for vhk, v in sorted((console or {}).get("validators", {}).items()):
        for combo in v.get("uncalibrated") or []:
            out.append(f"validator {vhk[:10]} audits {combo} without a calibrated tolerance: it withholds "
                       f"penalties there (only gross errors fail); calibrate it with scripts/calibrate_audit.py")
    for s in m.stages:
        probation = [mm for mm in m.miners if mm.stage == s.stage and mm.standing == "probation"]
        if probation:
            who = ", ".join(f"{mm.hotkey[:10]} (until round {mm.quarantined_until})" for mm in probation)
            out.append(f"stage {s.stage} trains on replicas that failed an audit: {who}. No live replica of "
                       f"the stage is in good standing, so they keep it training, unpaid; add a replica")
    if m.empty_rounds:
        why = "; ".join(f"{n} x {r}" for r, n in m.last_empty_reasons.items()) or "no reason recorded"
        out.append(f"{m.empty_rounds} round(s) trained nothing (every sample abandoned) and do not count "
                   f"towards the run's {run.total_rounds} rounds; the latest, round {m.last_empty_round}: {why}")
    return out


def console_handlers(svc: Any, run: RunConfig, store_path: str,
                     owner_hotkey: Callable[[], str | None], ttl: float = 3600.0,
                     heard: Callable[[], dict[str, float]] = dict,
                     docs: Any = None,
                     auth_counts: Mapping[str, int] | None = None) -> tuple[dict[str, Callable], BridgeMetrics]:
    """Handlers of the dashboard, JSON, Prometheus, validator-report and model routes, and the
    metrics; `heard()` gives when each hotkey last made a signed request (`docs`: the shared
    database holding validators' reports, else a file at `store_path`)."""
    from bridge.views import metrics as metrics_view, miner_presence
    store = ConsoleStore(store_path, docs)
    page = resources.files("bridge").joinpath("static/dashboard.html").read_text(encoding="utf-8")

    def read_metrics() -> Metrics:
        return svc.read(lambda st: metrics_view(st, time.time()))

    prom = BridgeMetrics(read_metrics, store.snapshot, auth_counts)
    history = RoundHistory(svc.db.done_hops, on_new=prom.round_closed)
    model = ModelApi(svc, run, store, ttl, history.loss)
    cache: dict[str, Any] = {}
    owner: list[Any] = [-1e9, None]  # looked up at most once a minute: a metagraph read is a chain call

    def owner_cached() -> str | None:
        if time.monotonic() - owner[0] > 60.0:
            owner[:] = [time.monotonic(), owner_hotkey()]
        return owner[1]

    async def cached(name: str, build: Callable[[], Any]) -> Any:
        hit = cache.get(name)
        if hit is None or time.monotonic() - hit[0] > CACHE_SECONDS:
            hit = cache[name] = (time.monotonic(), await run_in_threadpool(build))
        return hit[1]

    def closed_rounds(m: Metrics) -> list[dict[str, Any]]:
        return history.closed(m.round + 1 if m.phase == Phase.DONE else m.round)

    def build_state() -> dict[str, Any]:
        m, presence = svc.read(lambda st: (metrics_view(st, time.time()), miner_presence(st, time.time())))
        return dashboard_state(m, run, closed_rounds(m), store.snapshot(), owner_cached(), time.time(),
                               presence, dict(heard()), svc.tun.health_timeout)

    def render_metrics() -> bytes:
        closed_rounds(read_metrics())  # observes newly closed rounds even when no page is open
        return prom.render()

    async def dashboard_page(caller: None, req: None) -> HTMLResponse:
        return HTMLResponse(page)

    async def dashboard_json(caller: None, req: None) -> Response:
        body = await cached("state", lambda: json.dumps(build_state()).encode())
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    async def prometheus_metrics(caller: None, req: None) -> Response:
        return Response(await cached("prom", render_metrics), media_type=CONTENT_TYPE)

    async def validator_report(caller: str, req: ValidatorReport) -> Ack:
        await run_in_threadpool(store.add, caller, req, time.time())
        prom.validator_reports.inc()
        return Ack()

    async def validation_loss(caller: str, req: Any) -> Ack:
        ack = await model.validation_loss(caller, req)
        prom.validation_reports.inc()
        return ack

    return {"dashboard_page": dashboard_page, "dashboard": dashboard_json,
            "prometheus": prometheus_metrics, "validator_report": validator_report,
            "model": model.model, "validation_loss": validation_loss}, prom

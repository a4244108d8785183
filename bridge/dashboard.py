"""The owner's read-only dashboard: `GET /` (a static page), `GET /v1/dashboard` (its JSON),
`GET /metrics` (Prometheus) and `POST /v1/validator/report` (validators publish verdicts/weights).

The page polls the JSON every few seconds. Nothing secret is on it: hotkeys, counters, losses
and the weights validators set (which are public on chain anyway). Unsigned routes are cached
for a second so that scraping or many open tabs cost the bridge next to nothing.
"""
from __future__ import annotations

import json
import time
from importlib import resources
from collections.abc import Mapping
from typing import Any, Callable

from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from bridge.console_store import ConsoleStore
from bridge.dashboard_history import RoundHistory
from bridge.prometheus import CONTENT_TYPE, BridgeMetrics
from protocol.console import ValidatorReport
from protocol.lifecycle import Phase
from protocol.messages import Ack, Metrics, RunConfig

__all__ = ["dashboard_state", "wire_bytes", "console_handlers", "CACHE_SECONDS"]

CACHE_SECONDS = 1.0


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


def dashboard_state(m: Metrics, run: RunConfig, rounds: list[dict[str, Any]],
                    console: dict[str, Any], owner_hotkey: str | None, now: float) -> dict[str, Any]:
    """Everything the page shows, as one JSON-able dict (pure)."""
    weights, weights_by = _latest_weights(console)
    scores = _latest_scores(console)
    last = rounds[-1]["miners"] if rounds else {}
    miners = []
    for mm in m.miners:
        a = console["audits"].get(mm.hotkey, {})
        miners.append({
            "hotkey": mm.hotkey, "stage": mm.stage, "healthy": mm.healthy, "health": mm.health,
            "hops": mm.hops_done, "hops_per_s": mm.throughput, "lease_expiries": mm.lease_expiries,
            "compute_fraction": last.get(mm.hotkey, {}).get("compute_fraction"),
            "audits_passed": a.get("passed", 0), "audits_failed": a.get("failed", 0),
            "last_audit": None if "last_round" not in a else {
                "round": a["last_round"], "passed": a["last_passed"], "reason": a["last_reason"]},
            "score": scores.get(mm.hotkey), "standing": mm.standing,
            "quarantined_until": mm.quarantined_until,
            # once weights are published, a miner left out of them has weight 0
            "weight": weights.get(mm.hotkey, 0.0) if weights_by else None})
    stages = [{"stage": s.stage, "replicas": s.replicas, "healthy": s.healthy_replicas,
               "hops": s.hops_done, "bytes": s.bytes_moved, "published_round": s.published_round,
               "miners": [mm.hotkey for mm in m.miners if mm.stage == s.stage],
               "probation": [mm.hotkey for mm in m.miners if mm.stage == s.stage and mm.standing == "probation"]}
              for s in m.stages]
    return {
        "generated_at": now, "run_id": m.run_id, "phase": m.phase, "round": m.round,
        "total_rounds": run.total_rounds, "n_stages": run.n_stages,
        "progress": {"total": m.samples_total, "completed": m.samples_completed,
                     "abandoned": m.samples_abandoned},
        "samples": {"completed": m.completed_total, "abandoned": m.abandoned_total,
                    "abandon_reasons": dict(sorted(m.abandon_reasons.items()))},
        "stages": stages, "miners": miners, "bytes": wire_bytes(m, run),
        "loss_curve": [{"round": r["round"], "loss": r["loss"]} for r in rounds if r["loss"] is not None],
        "recent_losses": m.recent_losses[-32:],
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


def console_handlers(svc: Any, run: RunConfig, store_path: str, owner_hotkey: Callable[[], str | None],
                     auth_counts: Mapping[str, int] | None = None) -> tuple[dict[str, Callable], BridgeMetrics]:
    """Handlers of the dashboard, JSON, Prometheus and validator-report routes, and the metrics."""
    from bridge.views import metrics as metrics_view
    store = ConsoleStore(store_path)
    page = resources.files("bridge").joinpath("static/dashboard.html").read_text(encoding="utf-8")

    def read_metrics() -> Metrics:
        return svc.read(lambda st: metrics_view(st, time.time()))

    prom = BridgeMetrics(read_metrics, store.snapshot, auth_counts)
    history = RoundHistory(svc.db.done_hops, on_new=prom.round_closed)
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
        m = read_metrics()
        return dashboard_state(m, run, closed_rounds(m), store.snapshot(), owner_cached(), time.time())

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

    return {"dashboard_page": dashboard_page, "dashboard": dashboard_json,
            "prometheus": prometheus_metrics, "validator_report": validator_report}, prom

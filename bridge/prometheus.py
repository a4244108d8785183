"""Prometheus metrics of the bridge (`GET /metrics`): live state read at scrape time, plus histograms.

Counters and gauges come from the same view as the signed `/v1/metrics` (so the two never
disagree); histograms are observed as hops complete and as rounds close.
Each app has its own registry, so several bridges can live in one process (tests).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.console_store import validation_figure
from protocol.lifecycle import Phase
from protocol.messages import Metrics

__all__ = ["BridgeMetrics", "StateCollector", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PHASES = tuple(p.value for p in Phase)
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SEAL_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_BYTES = tuple(float(4**i * 1024) for i in range(1, 12))  # 4 KiB .. 4 GiB


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class StateCollector(Collector):
    """Turns the bridge's metrics view and validators' reports into metric families per scrape."""

    def __init__(self, read: Callable[[], Metrics], console: Callable[[], dict[str, Any]],
                 auth_counts: Mapping[str, int] | None = None) -> None:
        self.read, self.console, self.auth_counts = read, console, auth_counts

    def collect(self) -> Iterator[Any]:
        """One scrape: read the state once and emit every family."""
        m = self.read()
        g = _gauge("resbm_bridge_round", "current round", ["run_id"])
        g.add_metric([m.run_id], m.round)
        yield g
        g = _gauge("resbm_bridge_phase", "1 for the current phase", ["phase"])
        for p in _PHASES:
            g.add_metric([p], 1.0 if m.phase == p else 0.0)
        yield g
        c = _counter("resbm_bridge_samples", "samples finished over the run", ["outcome"])
        c.add_metric(["completed"], m.completed_total)
        c.add_metric(["abandoned"], m.abandoned_total)
        yield c
        c = _counter("resbm_bridge_abandoned_samples", "abandoned samples by reason", ["reason"])
        for reason, n in sorted(m.abandon_reasons.items()):
            c.add_metric([reason], n)
        yield c
        c = _counter("resbm_bridge_empty_rounds", "closed rounds that completed no sample (not counted "
                     "towards total_rounds)", [])
        c.add_metric([], m.empty_rounds)
        yield c
        g = _gauge("resbm_bridge_round_samples", "samples of the current round", ["state"])
        g.add_metric(["total"], m.samples_total)
        g.add_metric(["completed"], m.samples_completed)
        g.add_metric(["abandoned"], m.samples_abandoned)
        yield g
        yield from self._stages(m)
        yield from self._miners(m)
        yield from self._validators()
        if self.auth_counts is not None:
            c = _counter("resbm_bridge_auth_requests", "signed-route requests by authentication outcome "
                         "(signature_checked: reached signature verification; unknown_rate_limited: "
                         "an unregistered hotkey over its budget, refused before any signature work)",
                         ["outcome"])
            for outcome, n in sorted(dict(self.auth_counts).items()):
                c.add_metric([outcome], n)
            yield c

    def _stages(self, m: Metrics) -> Iterator[Any]:
        fams = {
            "hops": _counter("resbm_bridge_stage_hops", "verified hops per stage", ["stage"]),
            "bytes": _counter("resbm_bridge_stage_bytes", "boundary bytes moved per stage", ["stage"]),
            "exp": _counter("resbm_bridge_stage_lease_expiries", "leases that expired", ["stage"]),
            "rr": _counter("resbm_bridge_stage_reroutes", "hops rerouted to another replica", ["stage"]),
            "rep": _gauge("resbm_bridge_stage_replicas", "registered replicas", ["stage", "healthy"]),
            "pub": _gauge("resbm_bridge_stage_published_round", "round the stage's merged state starts",
                          ["stage"]),
            "merges": _counter("resbm_bridge_stage_merges", "merged states published", ["stage"]),
            "prob": _gauge("resbm_bridge_stage_probation_replicas", "replicas that failed an audit but keep "
                           "the stage training (no live replica in good standing), unpaid", ["stage"]),
        }
        for s in m.stages:
            lab = [str(s.stage)]
            fams["hops"].add_metric(lab, s.hops_done)
            fams["bytes"].add_metric(lab, s.bytes_moved)
            fams["exp"].add_metric(lab, s.lease_expiries)
            fams["rr"].add_metric(lab, s.reroutes)
            fams["rep"].add_metric([str(s.stage), "true"], s.healthy_replicas)
            fams["rep"].add_metric([str(s.stage), "false"], s.replicas - s.healthy_replicas)
            fams["pub"].add_metric(lab, s.published_round)
            fams["merges"].add_metric(lab, max(0, s.published_round))  # round r+1's state = r+1 merges
            fams["prob"].add_metric(lab, sum(mm.stage == s.stage and mm.standing == "probation" for mm in m.miners))
        yield from fams.values()

    def _miners(self, m: Metrics) -> Iterator[Any]:
        lab = ["hotkey", "stage"]
        hops = _counter("resbm_bridge_miner_hops", "verified hops per miner", lab)
        byt = _counter("resbm_bridge_miner_bytes", "bytes moved per miner", lab)
        exp = _counter("resbm_bridge_miner_lease_expiries", "expired leases per miner", lab)
        dis = _counter("resbm_bridge_miner_merge_disagreements", "merge votes against the majority", lab)
        health = _gauge("resbm_bridge_miner_health", "routing health in [0, 1]", lab)
        tput = _gauge("resbm_bridge_miner_throughput", "EMA of verified hops per second", lab)
        for mm in m.miners:
            key = [mm.hotkey, str(mm.stage)]
            hops.add_metric(key, mm.hops_done)
            byt.add_metric(key, mm.bytes_moved)
            exp.add_metric(key, mm.lease_expiries)
            dis.add_metric(key, mm.merge_disagreements)
            health.add_metric(key, mm.health)
            tput.add_metric(key, mm.throughput)
        yield from (hops, byt, exp, dis, health, tput)

    def _validators(self) -> Iterator[Any]:
        doc = self.console()
        audits = _counter("resbm_bridge_audits", "audit verdicts validators reported", ["hotkey", "verdict"])
        for hotkey, a in sorted(doc["audits"].items()):
            audits.add_metric([hotkey, "pass"], a["passed"])
            audits.add_metric([hotkey, "fail"], a["failed"])
        weight = _gauge("resbm_bridge_weight", "weight each validator last set", ["validator", "hotkey"])
        for vhk, v in sorted(doc["validators"].items()):
            for hotkey, w in sorted((v.get("weights") or {}).items()):
                weight.add_metric([vhk, hotkey], w)
        yield from (audits, weight)
        rounds = [int(r) for r, reports in doc.get("validation", {}).items() if reports]
        if rounds:  # absent until a validator reports: a 0 would read as a perfect model
            last = max(rounds)
            fig = validation_figure(doc["validation"][str(last)])
            g = _gauge("resbm_bridge_validation_loss", "median of validators' held-out loss of the "
                       "latest evaluated round's model (nats/token)", [])
            g.add_metric([], fig["loss"])
            yield g
            g = _gauge("resbm_bridge_validation_round", "round whose model the validation loss is of", [])
            g.add_metric([], last)
            yield g
            g = _gauge("resbm_bridge_validation_validators", "validators whose reports the median is over", [])
            g.add_metric([], fig["validators"])
            yield g


class _TrainingLoss(Collector):
    """The latest closed round's training loss, absent until a round closed with one."""

    def __init__(self, last: Callable[[], Optional[tuple[int, float]]]) -> None:
        self.last = last

    def collect(self) -> Iterator[Any]:
        """The loss and its round, once known."""
        got = self.last()
        if got is None:
            return
        g = _gauge("resbm_bridge_training_loss", "mean last-stage hop loss of the latest closed round "
                   "(nats/token)", [])
        g.add_metric([], got[1])
        yield g
        g = _gauge("resbm_bridge_training_loss_round", "round the training loss is of", [])
        g.add_metric([], got[0])
        yield g


class BridgeMetrics:
    """The bridge's registry: the state collector plus hop and merge histograms."""

    def __init__(self, read: Callable[[], Metrics], console: Callable[[], dict[str, Any]],
                 auth_counts: Mapping[str, int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(read, console, auth_counts))
        self.hop_seconds = Histogram("resbm_bridge_hop_seconds", "lease to verified completion",
                                     ["stage", "kind"], buckets=_SECONDS, registry=self.registry)
        self.hop_bytes = Histogram("resbm_bridge_hop_output_bytes", "size of a hop's uploaded output",
                                   ["stage", "kind"], buckets=_BYTES, registry=self.registry)
        self.round_seconds = Histogram("resbm_bridge_round_seconds",
                                       "closed round: first lease to last verified hop",
                                       buckets=_SECONDS, registry=self.registry)
        self.seal_seconds = Histogram("resbm_bridge_seal_seconds", "server-side copy of a hop output "
                                      "to its sealed key at done", ["stage"], buckets=_SEAL_SECONDS,
                                      registry=self.registry)
        self.validator_reports = Counter("resbm_bridge_validator_reports",
                                         "reports validators published", registry=self.registry)
        self.validation_reports = Counter("resbm_bridge_validation_reports",
                                          "held-out losses validators reported", registry=self.registry)
        self.last_training: Optional[tuple[int, float]] = None  # (round, loss) of the latest closed round
        self.registry.register(_TrainingLoss(lambda: self.last_training))

    def hop_done(self, stage: int, kind: str, seconds: float, size: int) -> None:
        """Observe one verified hop."""
        self.hop_seconds.labels(str(stage), kind).observe(max(0.0, seconds))
        self.hop_bytes.labels(str(stage), kind).observe(size)

    def sealed(self, stage: int, seconds: float) -> None:
        """Observe one hop output sealed (the S3 copy at `done`)."""
        self.seal_seconds.labels(str(stage)).observe(max(0.0, seconds))

    def round_closed(self, summary: dict[str, Any]) -> None:
        """Observe one closed round (a `dashboard_history.summarise_round` dict)."""
        self.round_seconds.observe(summary["seconds"])
        if summary.get("loss") is not None and (self.last_training is None
                                                or summary["round"] > self.last_training[0]):
            self.last_training = (summary["round"], summary["loss"])

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)

"""Prometheus metrics of the miner and the validator, served on `--metrics.port` (0: off).

Counters are read from the neuron's own bookkeeping at scrape time (`MinerStatus`, the validator's
audit log and score book), so they can never drift from what the neuron logs; histograms are
observed as hops are computed and weights are set.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

__all__ = ["MinerCollector", "ValidatorCollector", "miner_registry", "validator_registry", "serve"]

log = logging.getLogger(__name__)
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WEIGHTS = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _one(cls: Any, name: str, doc: str, value: float, labels: list[str] | None = None,
         values: list[str] | None = None) -> Any:
    fam = cls(name, doc, labels=labels or [])
    fam.add_metric(values or [], value)
    return fam


class MinerCollector(Collector):
    """The miner's counters and gauges from `MinerStatus.summary()`."""

    def __init__(self, status: Any) -> None:
        self.status = status

    def collect(self) -> Iterator[Any]:
        """One scrape."""
        s = self.status.summary()
        c, g = CounterMetricFamily, GaugeMetricFamily
        yield _one(c, "resbm_miner_hops", "hops the bridge accepted as done", s["hops_done"])
        yield _one(c, "resbm_miner_hops_computed", "hops computed (done or not)", self.status.hops_computed)
        yield _one(c, "resbm_miner_tokens", "tokens pushed through forward hops", self.status.tokens)
        yield _one(c, "resbm_miner_compute_seconds", "seconds spent computing hops", s["compute_seconds"])
        yield _one(c, "resbm_miner_net_seconds", "seconds spent moving objects", s["net_seconds"])
        yield _one(c, "resbm_miner_steps", "optimizer steps applied", s["steps"])
        yield _one(c, "resbm_miner_bad_inputs", "inputs that failed to decode", s["bad_inputs"])
        b = CounterMetricFamily("resbm_miner_bytes", "object bytes moved", labels=["direction"])
        b.add_metric(["up"], s["bytes_up"])
        b.add_metric(["down"], s["bytes_down"])
        yield b
        yield _one(g, "resbm_miner_compute_fraction", "compute seconds over wall seconds", s["compute_fraction"])
        spent = CounterMetricFamily("resbm_miner_seconds", "wall seconds of the main loop by activity "
                                    "(they sum to the wall time; neurons/timebook.py)", labels=["activity"])
        for activity, seconds in s["time"]["main"].items():
            spent.add_metric([activity], seconds)
        yield spent
        busy = CounterMetricFamily("resbm_miner_background_seconds", "busy seconds of the background "
                                   "threads by activity (overlapping the main loop)", labels=["activity"])
        for activity, seconds in s["time"]["background"].items():
            busy.add_metric([activity], seconds)
        yield busy
        if s["hop_wall_ratio"] is not None:
            yield _one(g, "resbm_miner_hop_wall_ratio", "in-round wall seconds per hop over compute "
                       "seconds per hop", s["hop_wall_ratio"])
        req = s.get("requests")
        if req is not None:
            rt = CounterMetricFamily("resbm_miner_requests", "HTTP round trips by route (retries included)",
                                     labels=["route"])
            for route, t in sorted(req["routes"].items()):
                rt.add_metric([route], t["count"])
            yield rt
            hk = CounterMetricFamily("resbm_miner_hop_requests", "round trips on done hops' paths, by hop kind "
                                     "and route", labels=["kind", "route"])
            for kind, k in sorted(req["hop_kinds"].items()):
                for route, t in sorted(k["requests"].items()):
                    hk.add_metric([kind, route], t["count"])
            yield hk
        yield _one(g, "resbm_miner_stage", "pipeline stage served", s["stage"])
        yield _one(g, "resbm_miner_round", "current round", s["round"])
        if s["last_loss"] is not None:
            yield _one(g, "resbm_miner_last_loss", "loss of the last hop that had one", s["last_loss"])


def miner_registry(status: Any) -> CollectorRegistry:
    """A registry for one miner: its status collector and a hop compute-time histogram."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MinerCollector(status))
    hist = Histogram("resbm_miner_hop_compute_seconds", "compute time of one hop", ["kind"],
                     buckets=_SECONDS, registry=reg)
    status.listeners.append(lambda seconds, hop: hist.labels(hop.kind).observe(seconds))
    return reg


class ValidatorCollector(Collector):
    """The validator's audit counts, windows, scores and last weights."""

    def __init__(self, validator: Any) -> None:
        self.v = validator

    def collect(self) -> Iterator[Any]:
        """One scrape."""
        v, a = self.v, self.v.audits
        out = CounterMetricFamily("resbm_validator_audits", "audits by outcome", labels=["outcome"])
        out.add_metric(["pass"], a.runs - a.failed)
        out.add_metric(["fail"], a.failed)
        out.add_metric(["incomplete"], a.incomplete)
        out.add_metric(["withheld"], getattr(a, "withheld", 0))  # uncalibrated or inconclusive: no verdict
        yield out
        yield SummaryMetricFamily("resbm_validator_audit_seconds", "compute time of finished audits",
                                  count_value=a.runs, sum_value=a.seconds)
        yield _one(CounterMetricFamily, "resbm_validator_weight_sets", "weights set on chain", v.weights_set)
        yield _one(GaugeMetricFamily, "resbm_validator_next_round", "next round to process", v.next_round)
        yield _one(GaugeMetricFamily, "resbm_validator_window", "score windows closed", v.book.window)
        sc = GaugeMetricFamily("resbm_validator_score", "smoothed score per miner", labels=["hotkey"])
        for hotkey, s in v.book.scores().items():
            sc.add_metric([hotkey], s)
        yield sc
        w = GaugeMetricFamily("resbm_validator_weight", "weight last set per uid", labels=["uid"])
        for uid, x in sorted((getattr(v, "last_weights", None) or {}).items()):
            w.add_metric([str(uid)], x)
        yield w


def validator_registry(validator: Any) -> CollectorRegistry:
    """A registry for one validator; hooks its weight sets into a weight-value histogram."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ValidatorCollector(validator))
    hist = Histogram("resbm_validator_weight_value", "weights of each set, one observation per uid",
                     buckets=_WEIGHTS, registry=reg)

    def observe(_uids: Any, weights: Any) -> None:
        for w in weights:
            hist.observe(w)
    validator.on_weights = observe
    return reg


def serve(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> None:
    """Serve `registry` at http://addr:port/metrics; exits with one line if the port is taken."""
    if port <= 0:
        return
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise SystemExit(f"--metrics.port {port}: cannot listen ({exc}); pick a free port, or 0 to disable")
    log.info("prometheus metrics on http://%s:%d/metrics", addr, port)

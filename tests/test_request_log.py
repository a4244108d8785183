"""The miner's request counters: requests tied to the hop they serve, retries counted, overlap with
compute measured; the round-trips table the network benchmark builds from them."""
from __future__ import annotations

import http.server
import threading
from types import SimpleNamespace as NS

import pytest

from neurons.request_log import RequestLog, overlap
from neurons.transfer import ObjectTransfer
from scripts.bench_network_rtt import format_other_table, format_rtt_table, hop_round_trips, other_round_trips


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _hop(hid, kind, act=None, grad=None, put=None):
    ref = lambda url: NS(url=url) if url else None  # noqa: E731
    return NS(hop_id=hid, kind=kind, act_in=ref(act), grad_in=ref(grad), output=NS(put_url=put) if put else None)


def _lease(*hops, wait_ms=2000):
    return NS(wait_ms=wait_ms), NS(action="work", hops=list(hops))


def test_overlap_sums_the_covered_part_of_an_interval():
    assert overlap(1.0, 3.0, [(0.0, 1.5), (2.5, 2.7), (4.0, 5.0)]) == pytest.approx(0.5 + 0.2)
    assert overlap(1.0, 2.0, []) == 0.0


def test_each_request_is_tied_to_its_hop_and_folded_with_its_overlap():
    clock = Clock()
    log = RequestLog(clock)
    h = _hop("h1", "fwdbwd", act="http://s3/a1", put="http://s3/o1")
    req, resp = _lease(h)
    log.on_call("lease", req, resp, 0.0, 1.0, True, 1)
    log.on_transfer("GET", "http://s3/a1", 1000, 1.0, 1.2, True, 1)
    clock.t = 2.0
    log.on_compute(0.8, h)  # its own compute: 1.2 .. 2.0
    log.on_transfer("PUT", "http://s3/o1", 1000, 2.0, 2.3, True, 1)
    log.on_call("hop_done", NS(hop_id="h1"), NS(), 2.3, 2.5, True, 2)  # one retry
    assert log.summary()["hop_kinds"] == {}  # not settled: a compute running now may still overlap it
    clock.t = 2.2
    log.on_compute(0.2, _hop("h2", "fwdbwd"))  # another hop computed 2.0 .. 2.2, during the PUT
    clock.t = 9.0
    log.on_compute(0.5, _hop("h3", "fwdbwd"))  # compute has moved past: h1 folds
    s = log.summary()
    k = s["hop_kinds"]["fwdbwd"]
    assert k["hops"] == 1
    r = k["requests"]
    assert set(r) == {"lease", "object_get", "object_put", "hop_done"}
    assert r["object_get"]["bytes"] == 1000 and r["object_put"]["bytes"] == 1000
    assert r["object_put"]["overlapped_s"] == pytest.approx(0.2)
    assert r["hop_done"]["count"] == 2 and r["hop_done"]["seconds"] == pytest.approx(0.2)
    assert s["routes"]["hop_done"]["count"] == 2 and s["routes"]["lease"]["count"] == 1


def test_prefetch_leases_failed_hops_and_unknown_objects_are_told_apart():
    log = RequestLog(Clock())
    a, b = _hop("a", "bwd", grad="http://s3/g"), _hop("b", "bwd", grad="http://s3/g2")
    req, resp = _lease(a, b, wait_ms=0)
    log.on_call("lease", req, resp, 0.0, 0.1, True)
    log.on_call("lease", NS(wait_ms=2000), None, 0.1, 0.2, False, 5)  # a failed lease, 5 tries
    log.on_transfer("GET", "http://s3/g", 10, 0.2, 0.3, True)
    log.on_transfer("GET", "http://elsewhere/x", 10, 0.2, 0.3, True)  # a state or dataset object
    log.on_call("hop_done", NS(hop_id="a"), NS(), 0.3, 0.4, True)
    log.on_call("hop_fail", NS(hop_id="b"), NS(), 0.3, 0.4, True)
    log.on_call("hop_done", NS(hop_id="b"), NS(), 0.4, 0.5, True)  # after its failure: not a hop any more
    log.settle()
    s = log.summary()
    assert s["hop_kinds"]["bwd"]["hops"] == 1
    assert s["hop_kinds"]["bwd"]["requests"]["lease_prefetch"]["count"] == 1
    assert s["routes"]["lease_prefetch"]["count"] == 1 and s["routes"]["lease"]["count"] == 5
    assert s["failed"] == {"lease": 1}
    assert s["routes"]["object_get"]["count"] == 2 and s["hop_kinds"]["bwd"]["requests"]["object_get"]["count"] == 1


class _Flaky(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hits += 1
        body = b"payload!"
        self.send_response(503 if type(self).hits == 1 else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_object_transfer_reports_each_get_with_its_retries():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen = []
    t = ObjectTransfer()
    t.on_request = lambda *a: seen.append(a)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/obj"
        assert t.get(url, max_bytes=100) == b"payload!"
    finally:
        t.close()
        server.shutdown()
    [(method, got_url, nbytes, t0, t1, ok, tries)] = seen
    assert (method, got_url, nbytes, ok, tries) == ("GET", url, 8, True, 2) and t1 >= t0


def _status(stage, kinds, routes):
    return {"stage": stage, "requests": {"hop_kinds": kinds, "routes": routes, "failed": {}}}


def _t(count, seconds=0.0, ovl=0.0, nbytes=0):
    return {"count": count, "seconds": seconds, "overlapped_s": ovl, "bytes": nbytes}


def test_round_trips_per_hop_sum_replicas_and_price_the_link():
    fwd = {"fwd": {"hops": 4, "requests": {"lease": _t(4, 2.0), "object_put": _t(4, 1.0, 0.5, 4000),
                                           "hop_done": _t(5, 1.0)}}}
    st = {"m0": _status(0, fwd, {"lease": _t(3), "step_done": _t(4), "merged": _t(2)}),
          "m2": _status(0, fwd, {"lease": _t(3), "step_done": _t(4), "merged": _t(4)}),
          "m1": _status(1, {"fwdbwd": {"hops": 0, "requests": {}}}, {})}
    [row] = hop_round_trips(st, rtt_ms=50, mbps=8)
    assert (row["stage"], row["kind"], row["hops"]) == (0, "fwd", 8)
    assert row["per_hop"] == {"lease": 1.0, "object_put": 1.0, "hop_done": 1.25}
    assert row["round_trips"] == pytest.approx(3.25) and row["bytes"] == pytest.approx(1000)
    assert row["link_s"] == pytest.approx(3.25 * 0.05 + 1000 * 8 / 8e6)
    assert row["overlapped_by_route"]["object_put"] == pytest.approx(0.5)
    other = other_round_trips(st, rounds=2)
    assert other == {"merged": pytest.approx(6 / 3 / 2), "step_done": pytest.approx(8 / 3 / 2)}
    table = format_rtt_table("(d)", [row], rtt_ms=50, mbps=8).splitlines()
    assert len(table) == 3 and all(line.count("|") == table[0].count("|") for line in table)
    assert "3.25" in table[2] and "50% ovl" in table[2]
    assert format_other_table("(d)", other).count("\n") == 2 and format_other_table("(d)", {}) == ""


def test_miner_metrics_export_round_trips_by_route_and_hop_kind():
    from prometheus_client import generate_latest

    from neurons.metrics import miner_registry
    from neurons.status import MinerStatus
    from neurons.transfer import TransferStats

    log = RequestLog(Clock())
    req, resp = _lease(_hop("h", "fwd", put="http://s3/o"))
    log.on_call("lease", req, resp, 0.0, 0.1, True)
    log.on_transfer("PUT", "http://s3/o", 5, 0.1, 0.2, True)
    log.on_call("hop_done", NS(hop_id="h"), NS(), 0.2, 0.3, True, 3)
    log.settle()
    status = MinerStatus(TransferStats())
    status.requests = log
    text = generate_latest(miner_registry(status)).decode()
    assert 'resbm_miner_requests_total{route="hop_done"} 3.0' in text
    assert 'resbm_miner_hop_requests_total{kind="fwd",route="object_put"} 1.0' in text
    assert status.summary()["requests"]["hop_kinds"]["fwd"]["hops"] == 1


def test_hops_carried_in_a_done_answer_cost_no_round_trip_of_their_own():
    clock = Clock()
    log = RequestLog(clock)
    h1, h2 = _hop("h1", "fwd", put="http://s3/o1"), _hop("h2", "fwd", put="http://s3/o2")
    log.on_call("lease", *_lease(h1), 0.0, 1.0, True, 1)
    log.on_transfer("PUT", "http://s3/o1", 100, 1.5, 1.6, True, 1)
    # the done of h1 asks for more: its answer carries h2, so h2 has no lease round trip
    log.on_call("hop_done", NS(hop_id="h1"), NS(ok=True, lease=NS(action="work", hops=[h2])), 1.6, 1.7, True, 1)
    log.on_transfer("PUT", "http://s3/o2", 100, 2.5, 2.6, True, 1)
    log.on_call("hop_done", NS(hop_id="h2"), NS(ok=True, lease=None), 2.6, 2.7, True, 1)
    clock.t = 9.0
    log.on_compute(0.1, _hop("h3", "fwd"))
    s = log.summary()
    r = s["hop_kinds"]["fwd"]["requests"]
    assert s["hop_kinds"]["fwd"]["hops"] == 2
    assert r["lease"]["count"] == 1 and r["lease_carried"] == {"count": 0, "seconds": 0.0, "overlapped_s": 0.0,
                                                               "bytes": 0, "carried": 1}
    assert s["routes"]["hop_done"]["count"] == 2 and "lease_carried" not in s["routes"]
    [row] = hop_round_trips({"m": {"stage": 0, "requests": s}}, rtt_ms=50, mbps=0)
    assert row["per_hop"] == {"lease": 0.5, "object_put": 1.0, "hop_done": 1.0}  # 2.5 round trips, not 3
    assert row["round_trips"] == pytest.approx(2.5) and row["carried"] == pytest.approx(0.5)
    assert "50% of hops" in format_rtt_table("(d)", [row], rtt_ms=50, mbps=0)

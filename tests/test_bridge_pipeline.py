"""A simulated pipeline (no torch): fake workers move random bytes of the right sizes through
the real bridge API and real S3 for whole rounds, merge included; and a bridge crash mid-round."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import Counter

import pytest

from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.routes import route
from tests.harness.fake_worker import FakeWorker
from tests.servers import make_chain, start_bridge, tiny_run_config

def run_workers(keys, bridge, stop):
    ws = [FakeWorker(k, bridge.url, bridge.hotkey, stop) for k in keys]
    for w in ws:
        w.start()
    return ws


def wait_done(client, ws, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for w in ws:
            assert w.error is None, repr(w.error)
        m = client.get(route("metrics").path)
        if m["phase"] == "done":
            return m
        time.sleep(0.1)
    raise AssertionError(f"run did not finish: {m['phase']} round {m['round']}")


def check_db(db_path, n_samples, n_stages):
    """Every sample has exactly one done hop per (stage, kind): nothing lost, none twice."""
    con = sqlite3.connect(db_path)
    done = Counter()
    for (data,) in con.execute("SELECT data FROM hops WHERE status = 'done'"):
        h = json.loads(data)
        done[(h["sample_id"], h["stage"], h["kind"])] += 1
    con.close()
    want = {"fwd": n_stages - 1, "fwdbwd": 1, "bwd": n_stages - 1}
    per_kind = Counter(k for (_, _, k) in done)
    assert set(done.values()) == {1}
    assert per_kind == Counter({k: v * n_samples for k, v in want.items()})


@pytest.mark.slow
def test_two_stages_two_replicas_run_several_rounds_with_merge(tmp_path, s3_server):
    _, keys = make_chain(tmp_path / "chain.db", miners=4, validators=0)
    b = start_bridge(tmp_path, tiny_run_config(total_rounds=3), tmp_path / "chain.db", s3_server)
    stop = threading.Event()
    try:
        ws = run_workers(keys["miners"], b, stop)
        m = wait_done(ws[0].c, ws)
        assert m["completed_total"] == 24 and m["abandoned_total"] == 0
        assert all(s["published_round"] == 3 and s["state_sha"] for s in m["stages"])
        assert sum(x["merge_disagreements"] for x in m["miners"]) == 0
        assert all(x["hops_done"] > 0 for x in m["miners"])  # both replicas of each stage worked
        assert m["recent_losses"] and m["recent_losses"][-1] == 2.5
        check_db(b.db, 24, 2)
        check_late_reports(ws, m)
    finally:
        stop.set()
        b.stop()


def check_late_reports(ws, metrics):
    """Retried or late reports of finished rounds get the published result, not a 409."""
    published = {s["stage"]: s["state_sha"] for s in metrics["stages"]}
    seen = 0
    for w in ws:
        for round_, rep in sorted(w.reports.items()):
            if "pg" in rep:
                assert "already recorded" in w.c.post(route("pseudograd").path, rep["pg"])["message"]
                with pytest.raises(BridgeError) as e:
                    w.c.post(route("pseudograd").path, dict(rep["pg"], size=33))
                assert e.value.status == 409
            if "merged" in rep:
                ack = w.c.post(route("merged").path, rep["merged"])
                assert ack["published"] is True and ack["agreed"] is True
                assert ack["state"]["round"] == round_ + 1
                if round_ == 2:
                    assert ack["state"]["sha256"] == published[ack["state"]["stage"]]
                other = hashlib.sha256(b"other").hexdigest()
                wrong = dict(rep["merged"], sha256=other,
                             key=rep["merged"]["key"].rsplit("/", 1)[0] + "/state-" + other)
                ack = w.c.post(route("merged").path, wrong)
                assert ack["published"] is True and ack["agreed"] is False
                seen += 1
    assert seen >= 4 * 2  # every worker, at least the first and last rounds


@pytest.mark.slow
def test_bridge_killed_mid_round_loses_nothing(tmp_path, s3_server):
    _, keys = make_chain(tmp_path / "chain.db", miners=4, validators=0)
    cfg = tiny_run_config(total_rounds=2, samples_per_round=16, run_id="restart")
    b = start_bridge(tmp_path, cfg, tmp_path / "chain.db", s3_server)
    stop = threading.Event()
    try:
        ws = run_workers(keys["miners"], b, stop)
        probe = BridgeClient(keys["miners"][0], b.url, b.hotkey)
        while probe.get(route("metrics").path)["samples_completed"] < 4:
            time.sleep(0.02)
        b.kill()  # SIGKILL mid-round: no clean shutdown
        time.sleep(0.3)
        b = b.restart()
        m = wait_done(probe, ws)
        assert m["completed_total"] == 32 and m["abandoned_total"] == 0
        check_db(b.db, 32, 2)
    finally:
        stop.set()
        b.stop()

"""A simulated pipeline (no torch): fake workers move random bytes of the right sizes through
the real bridge API and real S3 for whole rounds, merge included; and a bridge crash mid-round."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections import Counter

import httpx
import pytest

from protocol.client import BridgeError, SignedClient
from tests.servers import make_chain, start_bridge, tiny_run_config

ACT, GRAD = 48, 40  # encoded sizes of this fake model's activation and gradient


class FakeWorker(threading.Thread):
    """A miner without a model: checks input hashes, uploads random outputs, steps, merges."""

    def __init__(self, keypair, url, hotkey, stop: threading.Event):
        super().__init__(daemon=True)
        self.c = SignedClient(keypair, url, hotkey, max_tries=40, backoff_s=0.1, max_backoff_s=0.5)
        self.http = httpx.Client(timeout=10)
        self.stop_ev, self.error, self.hops = stop, None, 0
        self.merged_rounds: set[int] = set()
        self.reports: dict[int, dict] = {}  # round -> the pseudograd / merged bodies it sent

    def run(self):
        try:
            self.loop()
        except Exception as exc:  # surfaced by the test
            self.error = exc

    def fetch(self, ref):
        if ref is None:
            return
        body = self.http.get(ref["url"]).content
        assert hashlib.sha256(body).hexdigest() == ref["sha256"], "input hash mismatch"

    def loop(self):
        a = self.c.post("/v1/miners/register", {})
        stage, n = a["stage"], a["run"]["n_stages"]
        req = {"max_hops": 2, "fwd_out_bytes": ACT if stage < n - 1 else 0,
               "bwd_out_bytes": GRAD if stage > 0 else 0, "wait_ms": 500}
        while not self.stop_ev.is_set():
            r = self.c.post("/v1/hops/lease", req)
            if r["action"] == "work":
                for hop in r["hops"]:
                    self.work(hop)
            elif r["action"] == "step":
                self.c.post("/v1/steps/done", {"round": r["round"], "inner_step": r["inner_step"],
                                               "samples": r["step_samples"]})
            elif r["action"] == "merge" and r["round"] not in self.merged_rounds:
                self.merge(r["round"], stage)
            elif r["action"] == "done":
                return
            else:
                time.sleep(0.02)

    def work(self, hop):
        self.fetch(hop["act_in"])
        self.fetch(hop["grad_in"])
        done = {"hop_id": hop["hop_id"], "size": 0, "loss": 2.5 if hop["kind"] == "fwdbwd" else None}
        if hop["output"]:
            data = os.urandom(hop["output"]["size"])
            assert self.http.put(hop["output"]["put_url"], content=data).status_code == 200
            done.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        try:
            self.c.post("/v1/hops/done", done)
            self.hops += 1
        except BridgeError as exc:  # a retry after a crash may find it applied already
            if exc.status != 409:
                raise

    def put(self, round_, kind, data):
        sha = hashlib.sha256(data).hexdigest()
        g = self.c.post("/v1/rounds/upload", {"round": round_, "kind": kind, "sha256": sha,
                                              "size": len(data)})
        assert self.http.put(g["put_url"], content=data).status_code == 200
        return g["key"], sha

    def merge(self, round_, stage):
        try:
            key, sha = self.put(round_, "pseudograd", os.urandom(32))
            body = {"round": round_, "key": key, "sha256": sha, "size": 32}
            self.c.post("/v1/rounds/pseudograd", body)
            self.reports.setdefault(round_, {})["pg"] = body
        except BridgeError as exc:
            if exc.status != 409:  # did no work this round: nothing to report
                raise
        while True:
            try:
                ms = self.c.get(f"/v1/rounds/{round_}/stages/{stage}/pseudograds")
                break
            except BridgeError as exc:
                if exc.status != 409 or "not_frozen" not in exc.detail:
                    self.merged_rounds.add(round_)
                    return
                time.sleep(0.05)
        for item in ms["items"]:
            self.fetch({"url": item["get_url"], "sha256": item["sha256"]})
        merged = ("|".join(i["sha256"] for i in ms["items"]) + f"|{round_}").encode()
        try:
            key, sha = self.put(round_, "state", merged)
        except BridgeError as exc:
            # A merge set without us: its members published and the run moved on before we
            # could upload a state (a real miner then re-registers to load the published one).
            if exc.status != 409:
                raise
            self.merged_rounds.add(round_)
            return
        body = {"round": round_, "sha256": sha, "key": key}
        ack = self.c.post("/v1/rounds/merged", body)
        self.reports.setdefault(round_, {})["merged"] = body
        assert ack["agreed"] in (None, True)
        self.merged_rounds.add(round_)


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
        m = client.get("/v1/metrics")
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
                assert "already recorded" in w.c.post("/v1/rounds/pseudograd", rep["pg"])["message"]
                with pytest.raises(BridgeError) as e:
                    w.c.post("/v1/rounds/pseudograd", dict(rep["pg"], size=33))
                assert e.value.status == 409
            if "merged" in rep:
                ack = w.c.post("/v1/rounds/merged", rep["merged"])
                assert ack["published"] is True and ack["agreed"] is True
                assert ack["state"]["round"] == round_ + 1
                if round_ == 2:
                    assert ack["state"]["sha256"] == published[ack["state"]["stage"]]
                other = hashlib.sha256(b"other").hexdigest()
                wrong = dict(rep["merged"], sha256=other,
                             key=rep["merged"]["key"].rsplit("/", 1)[0] + "/state-" + other)
                ack = w.c.post("/v1/rounds/merged", wrong)
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
        probe = SignedClient(keys["miners"][0], b.url, b.hotkey)
        while probe.get("/v1/metrics")["samples_completed"] < 4:
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

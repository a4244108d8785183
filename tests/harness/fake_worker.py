"""A miner without a model for bridge tests: moves random bytes of the right sizes through the
real bridge API and real S3 (hops, steps, merges), recording the reports it sent."""
from __future__ import annotations

import hashlib
import os
import threading
import time

import httpx

from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.routes import route
from tests.servers import code_bytes, tiny_run_config

__all__ = ["FakeWorker", "ACT", "GRAD"]

ACT = GRAD = code_bytes(tiny_run_config())  # encoded size of a code and of its gradient


class FakeWorker(threading.Thread):
    """A miner without a model: checks input hashes, uploads random outputs, steps, merges."""

    def __init__(self, keypair, url, hotkey, stop: threading.Event, hop_seconds: float = 0.0):
        """`url`: the bridge's URL, or several (a list: the worker fails over between them);
        `hop_seconds`: extra time each hop takes (a deliberately slow replica)."""
        super().__init__(daemon=True)
        # a bridge restart imports torch (the run's code size): allow ~60 s on a loaded box
        self.c = BridgeClient(keypair, url, hotkey, max_tries=120, backoff_s=0.1,
                              max_backoff_s=0.5)
        self.http = httpx.Client(timeout=10)
        self.stop_ev, self.error, self.hops = stop, None, 0
        self.hop_seconds = hop_seconds
        self.leased: list[str] = []  # every hop id a lease gave it, in order
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
        a = self.c.post(route("register").path, {})
        stage, n = a["stage"], a["run"]["n_stages"]
        req = {"max_hops": 2, "fwd_out_bytes": ACT if stage < n - 1 else 0,
               "bwd_out_bytes": GRAD if stage > 0 else 0, "wait_ms": 500}
        while not self.stop_ev.is_set():
            r = self.c.post(route("lease").path, req)
            if r["action"] == "work":
                self.leased += [h["hop_id"] for h in r["hops"]]
                for hop in r["hops"]:
                    self.work(hop)
            elif r["action"] == "step":
                self.c.post(route("step_done").path, {"round": r["round"], "inner_step": r["inner_step"],
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
        if self.hop_seconds:
            time.sleep(self.hop_seconds)  # its "compute"
        done = {"hop_id": hop["hop_id"], "size": 0, "loss": 2.5 if hop["kind"] == "fwdbwd" else None}
        if hop["output"]:
            data = os.urandom(hop["output"]["size"])
            assert self.http.put(hop["output"]["put_url"], content=data).status_code == 200
            done.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        try:
            self.c.post(route("hop_done").path, done)
            self.hops += 1
        except BridgeError as exc:  # a retry after a crash may find it applied already
            if exc.status != 409:
                raise

    def put(self, round_, kind, data):
        sha = hashlib.sha256(data).hexdigest()
        g = self.c.post(route("upload").path, {"round": round_, "kind": kind, "sha256": sha,
                                              "size": len(data)})
        assert self.http.put(g["put_url"], content=data).status_code == 200
        return g["key"], sha

    def merge(self, round_, stage):
        try:
            key, sha = self.put(round_, "pseudograd", os.urandom(32))
            body = {"round": round_, "key": key, "sha256": sha, "size": 32}
            self.c.post(route("pseudograd").path, body)
            self.reports.setdefault(round_, {})["pg"] = body
        except BridgeError as exc:
            if exc.status != 409:
                raise
            # no work of ours in this round (or the set froze without us): like a real miner,
            # no vote; the published state comes with the next round
            self.merged_rounds.add(round_)
            return
        while True:
            try:
                ms = self.c.get(route("merge_set").target(round=round_, stage=stage))
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
        ack = self.c.post(route("merged").path, body)
        self.reports.setdefault(round_, {})["merged"] = body
        assert ack["agreed"] in (None, True)
        self.merged_rounds.add(round_)



"""The merge's wire rules against a real bridge and real S3: uploads go to the caller's own
staging key, reports are copied to write-once final keys, and a report's answer never depends
on which objects exist."""
from __future__ import annotations

import hashlib
import json
import threading

import httpx
import pytest

from protocol.client import BridgeError
from protocol.routes import route
from tests.harness.fake_worker import FakeWorker
from tests.servers import make_chain, start_bridge, tiny_run_config


class ProbingWorker(FakeWorker):
    """A fake replica that, in its first merge, also tries what an attacker would."""

    def __init__(self, *a, probes: dict, **kw):
        super().__init__(*a, **kw)
        self.probes = probes

    def merge(self, round_, stage):
        if round_ == 0 and "done" not in self.probes:
            self.probe(round_)
        super().merge(round_, stage)

    def probe(self, round_):
        p = self.probes
        key, sha = self.put(round_, "pseudograd", b"x" * 32)
        p["staging"] = key
        me = self.c.keypair.ss58_address
        other = key.replace(me, p["victim"])  # a registered peer's key (it may or may not exist)
        ghost = key.replace(me, "5" + "A" * 47)
        answers = []
        for k in (other, ghost, key.replace("/upload/", "/pg/"), "runs/../../etc/passwd", "z" * 512):
            with pytest.raises(BridgeError) as e:
                self.c.post(route("pseudograd").path, {"round": round_, "key": k, "sha256": sha, "size": 32})
            answers.append((e.value.status, json.loads(e.value.detail)["error"]))
        p["answers"] = answers
        sharded = []  # this run syncs whole states: every route of the sharded sync is refused
        for name, body in (("sync_upload", {"round": round_, "kind": "pg", "shard": 0, "sha256": sha, "size": 32}),
                           ("sync_pseudograd", {"round": round_, "shas": [sha] * 4, "sizes": [32] * 4}),
                           ("sync_votes", {"round": round_, "votes": [{"shard": 0, "sha256": sha, "size": 32}]})):
            with pytest.raises(BridgeError) as e:
                self.c.post(route(name).path, body)
            sharded.append((e.value.status, e.value.code))
        with pytest.raises(BridgeError) as e:
            self.c.get(route("sync_view").target(round=round_, stage=0))
        p["sharded"] = sharded + [(e.value.status, e.value.code)]
        with pytest.raises(BridgeError) as e:
            self.c.post(route("merged").path, {"round": round_, "key": "../" * 100, "sha256": sha})
        p["malformed_merged"] = e.value.status
        self.c.post(route("pseudograd").path, {"round": round_, "key": key, "sha256": sha, "size": 32})
        ms = None
        while ms is None:
            try:
                ms = self.c.get(route("merge_set").target(round=round_, stage=0))
            except BridgeError:
                pass
        mine = next(i for i in ms["items"] if i["hotkey"] == self.c.keypair.ss58_address)
        p["final_key"] = mine["key"]
        p["plan"] = self.c.get(route("shard_plan").target(round=round_, stage=0))
        p["plan_hotkeys"] = [i["hotkey"] for i in ms["items"]]
        g = self.c.post(route("upload").path, {"round": round_, "kind": "pseudograd", "sha256": sha, "size": 32})
        assert self.http.put(g["put_url"], content=b"y" * 32).status_code == 200  # clobber the staging copy
        p["final_after_clobber"] = httpx.get(mine["get_url"]).content
        p["sha"], p["done"] = sha, True


@pytest.mark.slow
def test_reports_copy_to_write_once_keys_and_answer_alike_for_any_foreign_key(tmp_path, s3_server):
    _, keys = make_chain(tmp_path / "chain.db", miners=2, validators=0)
    b = start_bridge(tmp_path, tiny_run_config(n_stages=1, total_rounds=1,
                                               samples_per_round=4, vote_timeout_seconds=5.0,
                                               # the prober never votes: its round ends by arbitration
                                               arbitration_timeout_seconds=3.0,
                                               sync_shards=4, sync_mergers=2), tmp_path / "chain.db", s3_server)
    stop, probes = threading.Event(), {"victim": keys["miners"][1].ss58_address}
    ws = [ProbingWorker(keys["miners"][0], b.url, b.hotkey, stop, probes=probes),
          FakeWorker(keys["miners"][1], b.url, b.hotkey, stop)]
    try:
        for w in ws:
            w.start()
        for w in ws:
            w.join(timeout=60)
        assert probes.get("done"), (probes, [w.error for w in ws])
        hk = keys["miners"][0].ss58_address
        assert f"/upload/{hk}/pg-" in probes["staging"]
        # another miner's key, a final key, traversal and junk: one answer, nothing learnt
        assert set(probes["answers"]) == {(400, "bad_key")}, probes["answers"]
        assert probes["malformed_merged"] == 400
        assert probes["sharded"] == [(409, "not_sharded")] * 4, probes["sharded"]
        assert probes["final_key"].endswith(f"/pg/{hk}-{probes['sha']}")
        # the bridge serves the round's shard assignment: the pure function of the frozen set
        from resbm.shards import assign_mergers
        plan = probes["plan"]
        assert plan["shards"] == 4 and len(plan["mergers"]) == 4
        assert plan["mergers"] == assign_mergers(0, 0, probes["plan_hotkeys"], 4, 2)
        assert probes["final_after_clobber"] == b"x" * 32  # the reported bytes, not the clobber
        assert hashlib.sha256(probes["final_after_clobber"]).hexdigest() == probes["sha"]
    finally:
        stop.set()
        b.stop()

"""The bridge API over real uvicorn, rclone S3 and a LocalChain: auth, bad input, metrics."""
from __future__ import annotations

import hashlib
import os
import threading
import time

import httpx
import pytest
from bittensor.sp_core import Keypair

from protocol.auth import sign_headers
from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.messages import PROTOCOL_VERSION, HopLog, Metrics
from protocol.routes import ROUTES, route
from tests.servers import code_bytes, make_chain, start_bridge, tiny_run_config

CODE = code_bytes(tiny_run_config())  # 422: what every hop output of this run is
LEASE = {"max_hops": 1, "fwd_out_bytes": CODE, "bwd_out_bytes": CODE}


@pytest.fixture(scope="module")
def env(tmp_path_factory, s3_server):
    d = tmp_path_factory.mktemp("api")
    _, keys = make_chain(d / "chain.db", miners=3, validators=1)
    b = start_bridge(d, tiny_run_config(), d / "chain.db", s3_server)
    clients = [BridgeClient(k, b.url, b.hotkey, max_tries=1) for k in keys["miners"]]
    clients[0].post(route("register").path, {})
    clients[1].post(route("register").path, {})
    yield b, keys, clients
    b.stop()


def status_of(fn, *a) -> int:
    with pytest.raises(BridgeError) as e:
        fn(*a)
    return e.value.status


def test_health_is_unsigned_and_names_the_hotkey(env):
    b, _, _ = env
    body = httpx.get(b.url + route("health").path).json()
    assert body == {"status": "ok", "hotkey": b.hotkey, "protocol_version": PROTOCOL_VERSION, "netuid": 1}


def test_auth_failures(env):
    b, keys, _ = env
    assert httpx.get(b.url + route("run").path).status_code == 401  # unsigned
    h = sign_headers(keys["miners"][0], "GET", route("run").path, b"", b.hotkey)
    assert httpx.get(b.url + route("run").path, headers=h).status_code == 200
    replay = httpx.get(b.url + route("run").path, headers=h)
    assert replay.status_code == 401 and "replayed" in replay.text
    stranger = BridgeClient(Keypair.create_from_uri("//stranger"), b.url, b.hotkey, max_tries=1)
    assert status_of(stranger.get, route("run").path) == 403
    miner = BridgeClient(keys["miners"][0], b.url, b.hotkey, max_tries=1)
    assert status_of(miner.get, route("hoplog").path, {"round": 0}) == 403
    val = BridgeClient(keys["validators"][0], b.url, b.hotkey, max_tries=1)
    assert val.get(route("hoplog").path, {"round": 0})["round"] == 0


def test_bad_input_is_rejected_and_loses_nothing(env, s3_server):
    b, _, (c0, c1, c2) = env
    assert status_of(c0.post, route("lease").path, dict(LEASE, fwd_out_bytes=10**6)) == 400
    assert status_of(c0.post, route("lease").path, dict(LEASE, extra=1)) == 400
    assert status_of(c2.post, route("lease").path, LEASE) == 409  # not registered with the bridge
    r = c0.post(route("lease").path, LEASE)
    assert r["action"] == "work"
    hop = r["hops"][0]
    data = os.urandom(CODE)
    sha = hashlib.sha256(data).hexdigest()
    done = {"hop_id": hop["hop_id"], "sha256": sha, "size": CODE}
    assert status_of(c0.post, route("hop_done").path, dict(done, hop_id="h999x999")) == 404
    assert status_of(c1.post, route("hop_done").path, done) == 409  # not leased to c1
    assert status_of(c0.post, route("hop_done").path, done) == 400  # nothing uploaded yet
    assert status_of(c0.post, route("hop_done").path, dict(done, size=CODE - 1)) == 400  # wrong size
    assert httpx.put(hop["output"]["put_url"], content=os.urandom(CODE + 1)).status_code >= 400
    assert httpx.put(hop["output"]["put_url"], content=data).status_code == 200
    assert c0.post(route("hop_done").path, done)["ok"] is True  # the hop stayed leased: retry works
    assert status_of(c0.post, route("hop_done").path, done) == 409  # done twice
    big = httpx.post(b.url + route("lease").path, content=b"x" * (2 << 20),
                     headers={"content-type": "application/json"})
    assert big.status_code == 413
    m = c0.get(route("metrics").path)
    assert m["stages"][0]["hops_done"] == 1 and m["stages"][0]["bytes_moved"] == CODE
    assert m["phase"] == "train" and m["samples_total"] == 8
    assert status_of(c0.post, route("upload").path,
                     {"round": 0, "kind": "pseudograd", "sha256": sha, "size": 10}) == 409


def test_hoplog_lists_done_hops_with_urls(env):
    b, keys, (c0, _, _) = env
    val = BridgeClient(keys["validators"][0], b.url, b.hotkey, max_tries=1)
    log = val.hoplog(0, keys["miners"][0].ss58_address)  # typed: a HopLog, not a dict
    assert isinstance(log, HopLog) and len(log.records) == 1
    rec = log.records[0]
    assert rec.kind == "fwd" and rec.output.key.startswith("runs/test-run/r0/s0/act/")
    assert len(httpx.get(rec.output.url).content) == CODE
    assert val.hoplog(0, "5NoSuchHotkey").records == []
    assert status_of(val.get, route("hoplog").path, {"round": -1}) == 400


def test_the_bridge_serves_exactly_the_route_table(env):
    b, keys, (c0, _, _) = env
    served = {p: set(ops) for p, ops in httpx.get(b.url + "/openapi.json").json()["paths"].items()}
    table = {r.path: {r.method.lower()} for r in ROUTES if r.in_schema}
    assert served == table
    assert isinstance(c0.metrics(), Metrics) and c0.run_info().run.run_id == "test-run"
    assert status_of(c0.shard_plan, 0, 0) == 409  # typed path parameters; frozen only at merge



def test_lease_long_poll_answers_wait_when_nothing_comes_and_wakes_with_the_new_hop(env):
    b, _, (c0, c1, _) = env
    lease1 = dict(LEASE, fwd_out_bytes=0)
    first = c1.post(route("lease").path, lease1)  # the stage-1 hop made by the earlier forward
    assert first["action"] == "work" and first["stage"] == 1
    r = c1.post(route("lease").path, dict(lease1, wait_ms=400))
    assert r["action"] == "wait" and r["retry_after"] == 0.0  # held by the bridge: poll again at once
    got: dict = {}

    def poll() -> None:  # a timed-out poll would answer "wait": "work" means the new hop woke it
        got["r"] = c1.post(route("lease").path, dict(lease1, wait_ms=30000))
    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.3)  # c1 is parked now
    hop = c0.post(route("lease").path, LEASE)["hops"][0]
    data = os.urandom(CODE)
    assert httpx.put(hop["output"]["put_url"], content=data).status_code == 200
    c0.post(route("hop_done").path, {"hop_id": hop["hop_id"], "sha256": hashlib.sha256(data).hexdigest(),
                              "size": CODE})
    th.join(timeout=60)
    assert got["r"]["action"] == "work"
    assert got["r"]["hops"][0]["sample_id"] == hop["sample_id"]
    m = c0.get(route("metrics").path)
    assert m["db_commits"] > 0 and m["db_rows_written"] >= m["db_commits"]

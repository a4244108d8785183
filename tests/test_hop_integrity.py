"""Hop outputs and claims against a real bridge (uvicorn), rclone S3 and a LocalChain: outputs
are sealed at `done`, claims are charged to whoever the bridge proves wrong, grants follow the
run's code size, validators cannot mine, and no signed request replays after a restart."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import torch
import yaml

from protocol.auth import sign_headers
from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.routes import route
from resbm import codec
from tests.servers import REPO, code_bytes, make_chain, start_bridge, tiny_run_config

CFG = tiny_run_config(micro_batches_per_step=64, samples_per_round=16, run_id="integrity")
CODE = code_bytes(CFG)
SHAPE = (1, 16, 4)  # tiny_run_config's code: batch 1, seq_len 16, bottleneck_dim 4 (bf16)


@pytest.fixture(scope="module")
def env(tmp_path_factory, s3_server):
    d = tmp_path_factory.mktemp("integrity")
    _, keys = make_chain(d / "chain.db", miners=6, validators=1)
    b = start_bridge(d, CFG, d / "chain.db", s3_server)
    cs = [BridgeClient(k, b.url, b.hotkey, max_tries=1) for k in keys["miners"]]
    stages = [c.post(route("register").path, {})["stage"] for c in cs]
    assert stages == [0, 1] * 3
    yield b, keys, cs
    b.stop()


def good_code(seed: int) -> bytes:
    return codec.encode(torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)), "bf16")


def nan_code() -> bytes:
    """A code whose header, size and trailing digest are right but holding a NaN."""
    body = bytearray(good_code(0)[:-32])
    off = 6 + codec.HEADER_LEN
    body[off:off + 2] = b"\xc0\x7f"  # bf16 NaN, little-endian
    return bytes(body) + hashlib.sha256(body).digest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lease(c, stage: int) -> dict:
    req = {"max_hops": 1, "fwd_out_bytes": CODE if stage == 0 else 0,
           "bwd_out_bytes": CODE if stage == 1 else 0}
    r = c.post(route("lease").path, req)
    assert r["action"] == "work", r
    return r["hops"][0]


def produce(c, data: bytes, reported: str | None = None) -> dict:
    """A stage-0 forward: upload `data`, report `reported` (default: its real sha256)."""
    hop = lease(c, 0)
    assert httpx.put(hop["output"]["put_url"], content=data).status_code == 200
    c.post(route("hop_done").path, {"hop_id": hop["hop_id"], "sha256": reported or sha(data),
                             "size": len(data)})
    return hop


def consume(cs, sample_id: int) -> tuple[int, dict]:
    """The stage-1 replica the sample's next hop went to leases it: (client index, hop)."""
    for _ in range(50):
        for i in (1, 3, 5):
            r = cs[i].post(route("lease").path, {"max_hops": 1, "fwd_out_bytes": 0,
                                              "bwd_out_bytes": CODE})
            for hop in r["hops"]:
                assert hop["sample_id"] == sample_id, "unrelated work leaked into the test"
                return i, hop
        time.sleep(0.05)
    raise AssertionError(f"no stage-1 replica got sample {sample_id}")


def miner(cs, i: int) -> dict:
    hk = cs[i].keypair.ss58_address
    return next(m for m in cs[0].get(route("metrics").path)["miners"] if m["hotkey"] == hk)


def hops_of(db, sample_id: int) -> list[dict]:
    con = sqlite3.connect(db)
    try:
        rows = [json.loads(d) for (d,) in con.execute("SELECT data FROM hops")]
    finally:
        con.close()
    return sorted((h for h in rows if h["sample_id"] == sample_id),
                  key=lambda h: int(h["hop_id"].split("x")[1]))


def test_output_cannot_be_changed_after_done(env):
    b, keys, cs = env
    a, z = good_code(1), good_code(2)
    hop = produce(cs[0], a)
    url = hop["output"]["put_url"]
    assert "/upload/act/" in hop["output"]["key"]
    # the same URL still writes until the lease deadline, but only the upload key
    assert httpx.put(url, content=z).status_code == 200
    # rclone refuses: a PUT re-pointed at the sealed key, another size, an unsigned sha header
    sealed = hop["output"]["key"].replace("/upload/act/", "/act/")
    assert httpx.put(url.replace(hop["output"]["key"], sealed), content=z).status_code == 403
    assert httpx.put(url, content=z + b"x").status_code == 403
    assert httpx.put(url, content=z, headers={"x-amz-content-sha256": sha(z)}).status_code == 403
    expires = int(parse_qs(urlparse(url).query)["X-Amz-Expires"][0])
    assert expires <= CFG["lease_seconds"]  # the grant dies with the lease
    who, nxt = consume(cs, hop["sample_id"])
    assert nxt["act_in"]["key"] == sealed and nxt["act_in"]["sha256"] == sha(a)
    assert httpx.get(nxt["act_in"]["url"]).content == a  # consumers read what was sealed
    grad = good_code(5)  # finish the sample: its grad back to stage 0, then stage 0's bwd
    assert httpx.put(nxt["output"]["put_url"], content=grad).status_code == 200
    cs[who].post(route("hop_done").path, {"hop_id": nxt["hop_id"], "sha256": sha(grad),
                                   "size": CODE, "loss": 2.0})
    bwd = cs[0].post(route("lease").path, {"max_hops": 1, "fwd_out_bytes": CODE,
                                        "bwd_out_bytes": 0})["hops"][0]
    assert bwd["kind"] == "bwd" and bwd["grad_in"]["sha256"] == sha(grad)
    cs[0].post(route("hop_done").path, {"hop_id": bwd["hop_id"]})
    val = BridgeClient(keys["validators"][0], b.url, b.hotkey, max_tries=1)
    rec = [r for r in val.get(route("hoplog").path, {"round": 0})["records"]
           if r["hop_id"] == hop["hop_id"]][0]
    assert rec["output"]["key"] == sealed and httpx.get(rec["output"]["url"]).content == a


def test_expired_grant_is_refused_by_the_store(s3_server):
    st = s3_server.storage()
    url = st.presign_put("expiry/probe", 3, 1)
    time.sleep(2.2)
    r = httpx.put(url, content=b"abc")
    assert r.status_code in (400, 403) and st.head("expiry/probe") is None


@pytest.mark.parametrize("liar,data,reported", [
    pytest.param(0, good_code(3), sha(b"not what was uploaded"), id="lying-sha"),
    pytest.param(2, nan_code(), None, id="nan-code"),  # correct sha, NaN inside
])
def test_consumer_claim_proven_charges_the_producer_and_redoes_its_hop(env, liar, data, reported):
    b, _, cs = env
    hop = produce(cs[liar], data, reported)
    who, nxt = consume(cs, hop["sample_id"])
    reason = "bad_hash" if reported else "nonfinite"
    ack = cs[who].post(route("hop_fail").path, {"hop_id": nxt["hop_id"], "reason": reason})
    assert "producer_charged" in ack["message"]
    p, c = miner(cs, liar), miner(cs, who)
    assert p["bad_outputs"] == 1 and p["failures"] == 1 and p["health"] < 1.0
    assert c["failures"] == 0 and c["false_claims"] == 0 and c["health"] == 1.0
    m = cs[0].get(route("metrics").path)
    assert m["samples_abandoned"] == 0
    hist = hops_of(b.db, hop["sample_id"])
    assert [(h["stage"], h["status"]) for h in hist[:2]] == [(0, "rejected"), (1, "failed")]
    redo = hist[-1]
    assert (redo["stage"], redo["kind"], redo["attempt"], redo["status"]) == (0, "fwd", 2, "pool")
    assert redo["avoid"] == [cs[liar].keypair.ss58_address]


def test_false_claim_charges_the_consumer_and_retries_elsewhere(env):
    b, _, cs = env
    hop = produce(cs[4], good_code(4))
    who, nxt = consume(cs, hop["sample_id"])
    ack = cs[who].post(route("hop_fail").path, {"hop_id": nxt["hop_id"], "reason": "nonfinite",
                                         "detail": "a NaN, honestly"})
    assert "consumer_charged" in ack["message"]
    c, p = miner(cs, who), miner(cs, 4)
    assert c["false_claims"] == 1 and c["failures"] == 1 and c["health"] < 1.0
    assert p["bad_outputs"] == 0 and p["health"] == 1.0
    assert cs[0].get(route("metrics").path)["samples_abandoned"] == 0
    retry = hops_of(b.db, hop["sample_id"])[-1]
    assert (retry["stage"], retry["attempt"]) == (1, 2)
    assert retry["act_in"][0] == nxt["act_in"]["key"]
    assert retry["assigned_to"] not in (None, cs[who].keypair.ss58_address)


def test_grants_follow_the_runs_code_size(env):
    _, _, cs = env
    for fwd in (64 * 2**20, CODE + 1, CODE - 1, 64):
        with pytest.raises(BridgeError) as e:
            cs[4].post(route("lease").path, {"max_hops": 1, "fwd_out_bytes": fwd, "bwd_out_bytes": 0})
        assert e.value.status == 400
    assert f"exactly {CODE} bytes" in e.value.detail


def test_validator_hotkey_cannot_register_as_a_miner(env):
    b, keys, _ = env
    val = BridgeClient(keys["validators"][0], b.url, b.hotkey, max_tries=1)
    with pytest.raises(BridgeError) as e:
        val.post(route("register").path, {})
    assert e.value.status == 403 and "validator permit" in e.value.detail
    assert all(m["hotkey"] != keys["validators"][0].ss58_address
               for m in val.get(route("metrics").path)["miners"])


def test_no_signed_request_replays_after_a_restart(env):
    b, keys, cs = env
    val = keys["validators"][0]
    sent = []
    for kp, method, target, body in (
            (keys["miners"][0], "GET", route("metrics").path, b""),
            (keys["miners"][0], "GET", route("run").path, b""),
            (val, "GET", route("hoplog").path + "?round=0", b""),
            (keys["miners"][0], "POST", route("hop_done").path, b'{"hop_id":"h9x999","size":0}')):
        h = sign_headers(kp, method, target, body, b.hotkey)
        if body:
            h["content-type"] = "application/json"
        r = httpx.request(method, b.url + target, headers=h, content=body)
        assert r.status_code in (200, 404), r.text
        sent.append((method, target, body, h))
    b.kill()  # SIGKILL at once: only what was on disk before each answer survives
    b2 = b.restart()
    try:
        for method, target, body, h in sent:
            r = httpx.request(method, b2.url + target, headers=h, content=body)
            assert r.status_code == 401 and "replayed" in r.text, (target, r.text)
    finally:
        b2.stop()


def test_bridge_refuses_a_run_whose_model_has_no_valid_code_shape(tmp_path):
    make_chain(tmp_path / "chain.db", miners=1, validators=0)
    bad = dict(CFG, model={"d_model": 32, "n_stages": 2})  # k = 32 / 128 is not an integer
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(bad))
    r = subprocess.run([sys.executable, "-m", "bridge", "--run-config", str(tmp_path / "run.yaml"),
                        "--chain", f"localchain:{tmp_path / 'chain.db'}", "--no-head-check",
                        "--hotkey-uri", "//bridge", "--db", str(tmp_path / "b.sqlite")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "bottleneck_ratio" in r.stderr.strip().splitlines()[-1]

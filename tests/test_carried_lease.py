"""The next lease answered with a report (issue 24, round trips): a `done` or `step_done` that asks
for it gets the next hops in its answer, over the real bridge, S3 and a LocalChain; a report that
does not ask gets exactly the old answer."""
from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from protocol.bridge_client import BridgeClient
from protocol.routes import route
from tests.servers import code_bytes, make_chain, start_bridge, tiny_run_config

CODE = code_bytes(tiny_run_config())
STAGE0 = {"max_hops": 1, "fwd_out_bytes": CODE, "bwd_out_bytes": 0}
STAGE1 = {"max_hops": 1, "fwd_out_bytes": 0, "bwd_out_bytes": CODE}


@pytest.fixture()
def pair(tmp_path, s3_server):
    _, keys = make_chain(tmp_path / "chain.db", miners=2, validators=0)
    b = start_bridge(tmp_path, tiny_run_config(), tmp_path / "chain.db", s3_server)
    c0, c1 = (BridgeClient(k, b.url, b.hotkey, max_tries=1) for k in keys["miners"])
    assert c0.post(route("register").path, {})["stage"] == 0
    assert c1.post(route("register").path, {})["stage"] == 1
    yield c0, c1
    b.stop()


def _upload(hop) -> dict:
    body = {"hop_id": hop["hop_id"], "size": 0}
    if hop["output"]:
        data = os.urandom(hop["output"]["size"])
        assert httpx.put(hop["output"]["put_url"], content=data).status_code == 200
        body.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    return body


def test_reports_that_ask_are_answered_with_the_next_hops_and_others_get_the_old_answers(pair):
    c0, c1 = pair
    hop = c0.post(route("lease").path, STAGE0)["hops"][0]
    ack = c0.post(route("hop_done").path, dict(_upload(hop), lease=STAGE0))
    assert ack["ok"] and ack["lease"]["action"] == "work"
    nxt = ack["lease"]["hops"][0]
    assert nxt["kind"] == "fwd" and nxt["stage"] == 0 and nxt["sample_id"] != hop["sample_id"]
    # a refused lease (not this run's code size) leaves the done applied, and says nothing
    bad = dict(STAGE0, fwd_out_bytes=CODE + 1)
    ack = c0.post(route("hop_done").path, dict(_upload(nxt), lease=bad))
    assert ack["ok"] and ack["lease"] is None
    # both forwards were applied: stage 1 has their two fwdbwd hops
    got = c1.post(route("lease").path, dict(STAGE1, max_hops=4))["hops"]
    assert {h["sample_id"] for h in got} == {hop["sample_id"], nxt["sample_id"]}
    for h1 in got:  # an older client's done (no lease asked): exactly the plain Ack
        assert c1.post(route("hop_done").path, dict(_upload(h1), loss=2.0)) == {"ok": True, "message": ""}
    for _ in range(2):
        bwd = c0.post(route("lease").path, STAGE0)["hops"][0]
        assert bwd["kind"] == "bwd"
        c0.post(route("hop_done").path, _upload(bwd))
    # micro_batches_per_step = 2: both replicas step now; a step report that asks gets the next hops
    step = c0.post(route("lease").path, STAGE0)
    assert step["action"] == "step" and step["step_samples"] == 2
    ack = c0.post(route("step_done").path, {"round": step["round"], "inner_step": step["inner_step"],
                                            "samples": 2, "lease": STAGE0})
    assert ack["inner_step"] == step["inner_step"] + 1
    assert ack["lease"]["action"] == "work" and ack["lease"]["inner_step"] == ack["inner_step"]
    assert ack["lease"]["hops"][0]["kind"] == "fwd"
    plain = c1.post(route("lease").path, STAGE1)
    assert plain["action"] == "step"
    old = c1.post(route("step_done").path, {"round": plain["round"], "inner_step": plain["inner_step"],
                                            "samples": plain["step_samples"]})
    assert set(old) == {"round", "inner_step"}  # an older client's answer, unchanged

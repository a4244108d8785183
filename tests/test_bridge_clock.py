"""The bridge's clock (bridge.clock): time's transitions happen with no request, and GETs write
nothing. A miner leases a hop and goes silent; only an observer reads the metrics."""
from __future__ import annotations

import time

from protocol.bridge_client import BridgeClient
from protocol.routes import route
from tests.harness.fake_worker import ACT, GRAD
from tests.harness.waiting import wait_for
from tests.servers import make_chain, start_bridge, tiny_run_config

LEASE_S = 2.0


def _lease_and_fall_silent(tmp, s3, tick: str):
    """A bridge ticking every `tick` seconds; one miner leases a hop of stage 0 and says nothing
    more. Returns (the bridge, an observer's client, the miners' keypairs: the first leased)."""
    tmp.mkdir()
    _, keys = make_chain(tmp / "chain.db", miners=2, validators=1)
    b = start_bridge(tmp, tiny_run_config(lease_seconds=LEASE_S), tmp / "chain.db", s3,
                     extra=("--tick-seconds", tick))
    miner = BridgeClient(keys["miners"][0], b.url, b.hotkey)
    assert miner.post(route("register").path, {})["stage"] == 0
    last = BridgeClient(keys["miners"][1], b.url, b.hotkey)
    assert last.post(route("register").path, {})["stage"] == 1  # a sample needs every stage
    r = miner.post(route("lease").path, {"max_hops": 1, "fwd_out_bytes": ACT, "bwd_out_bytes": GRAD,
                                         "wait_ms": 2000})
    assert r["action"] == "work" and len(r["hops"]) == 1, r
    return b, BridgeClient(keys["validators"][0], b.url, b.hotkey), keys["miners"]


def _expiries(observer: BridgeClient, hotkey: str) -> int:
    return next(m.lease_expiries for m in observer.metrics().miners if m.hotkey == hotkey)


def test_a_silent_miners_lease_expires_on_the_clock_with_no_request(tmp_path, s3_server):
    b, observer, miners = _lease_and_fall_silent(tmp_path / "tick", s3_server, "0.2")
    hk = miners[0].ss58_address
    try:
        wait_for(lambda: _expiries(observer, hk) == 1, 30, "the lease to expire with no miner request")
        assert "Traceback" not in b.log_path.read_text()
    finally:
        b.stop()


def test_without_the_clock_reads_alone_change_nothing(tmp_path, s3_server):
    """GETs are read-only: with the clock off, the expired lease stays on the books however often
    it is read, until a request that changes the state comes (here: the other miner asks for work)."""
    b, observer, miners = _lease_and_fall_silent(tmp_path / "still", s3_server, "0")
    hk = miners[0].ss58_address
    try:
        for _ in range(int(2 * LEASE_S / 0.2)):  # reading for at least twice the lease's length
            assert _expiries(observer, hk) == 0
            time.sleep(0.2)
        BridgeClient(miners[1], b.url, b.hotkey).post(route("lease").path, {
            "max_hops": 1, "fwd_out_bytes": 0, "bwd_out_bytes": GRAD, "wait_ms": 0})
        assert _expiries(observer, hk) == 1
    finally:
        b.stop()

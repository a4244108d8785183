"""Floods of unregistered hotkeys against the real bridge process: refused with 429 before any
signature work beyond a small budget, while a registered miner keeps being served.

The bridge counts how many requests reached signature verification
(`resbm_bridge_auth_requests_total{outcome="signature_checked"}` on `/metrics`), which is what
the budget bounds."""
from __future__ import annotations

import os
import re
import threading
import time

import httpx
import pytest
from bittensor.sp_core import Keypair

from bridge.dashboard import CACHE_SECONDS
from protocol.auth import sign_headers
from protocol.bridge_client import BridgeClient
from protocol.messages import LeaseRequest
from protocol.routes import route
from tests.servers import code_bytes, make_chain, start_bridge, tiny_run_config

UNKNOWN_RATE = 4.0  # --unknown-rate: signature checks/s for all unregistered hotkeys together
PER_KEY_RATE, PER_KEY_BURST = 0.5, 2.0  # what bridge.auth.UnknownKeyBudget derives from it
SHARED_BURST = 2 * UNKNOWN_RATE


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    root = tmp_path_factory.mktemp("flood")
    _, keys = make_chain(root / "chain.db", miners=1, validators=0, prefix="flood")
    b = start_bridge(root / "bridge", tiny_run_config(), root / "chain.db", None,
                     extra=("--no-head-check", "--unknown-rate", str(UNKNOWN_RATE)))
    b.miner = keys["miners"][0]
    yield b
    b.stop()


def _auth_counts(url: str) -> dict[str, float]:
    time.sleep(CACHE_SECONDS + 0.1)  # the bridge serves /metrics from a cache this old at most
    text = httpx.get(url + route("prometheus").path, timeout=10).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'resbm_bridge_auth_requests_total\{outcome="(\w+)"\} ([0-9.e+]+)', text)}


def _flood(url: str, receiver: str, signers: list[Keypair], n: int, threads: int = 2,
           until: threading.Event | None = None) -> list[int]:
    """At least `n` signed lease requests (and on until `until` is set), each from the next signer
    in turn; their HTTP statuses."""
    body = LeaseRequest(max_hops=1, fwd_out_bytes=1, bwd_out_bytes=1).model_dump_json().encode()
    path = route("lease").path
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        i = k
        with httpx.Client(base_url=url, timeout=30) as http:
            while i < n or (until is not None and not until.is_set()):
                headers = sign_headers(signers[i % len(signers)], "POST", path, body, receiver)
                status = http.post(path, content=body, headers={**headers, "content-type": "application/json"}).status_code
                with lock:
                    statuses.append(status)
                i += threads
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return statuses


def _served_during(client: BridgeClient, n: int, out: list, done: threading.Event) -> None:
    """A registered miner's `n` requests while the flood runs: every answer recorded."""
    req = LeaseRequest(max_hops=1, fwd_out_bytes=code_bytes(tiny_run_config()), bwd_out_bytes=0, wait_ms=0)
    try:
        for _ in range(n):
            try:
                out.append(client.lease(req).action)
            except Exception as exc:  # noqa: BLE001 - recorded: the assertion names it
                out.append(repr(exc))
    finally:
        done.set()


def test_one_unregistered_hotkey_gets_429_while_a_registered_miner_keeps_working(bridge):
    miner = BridgeClient(bridge.miner, bridge.url, bridge.hotkey, max_tries=1)
    assert miner.post(route("register").path, {})["stage"] == 0
    before = _auth_counts(bridge.url)
    done, served = threading.Event(), []
    t = threading.Thread(target=_served_during, args=(miner, 5, served, done))
    t0 = time.monotonic()
    t.start()
    statuses = _flood(bridge.url, bridge.hotkey, [Keypair.create_from_uri("//eve-unregistered")], 200,
                      until=done)
    elapsed = time.monotonic() - t0
    t.join()
    after = _auth_counts(bridge.url)
    reached = [s for s in statuses if s != 429]
    assert set(reached) <= {403}, statuses  # checked and refused: not registered
    assert len(reached) <= PER_KEY_BURST + PER_KEY_RATE * elapsed + 1, (len(reached), elapsed)
    assert statuses.count(429) >= len(statuses) - (PER_KEY_BURST + PER_KEY_RATE * elapsed + 1)
    assert len(served) == 5 and all(a == "wait" for a in served), served  # its stage waits for stage 1
    # the bridge's own count: only the miner's requests and the flood's few budgeted ones were verified
    checked = after["signature_checked"] - before["signature_checked"]
    assert checked == len(served) + len(reached)
    assert after["unknown_rate_limited"] - before["unknown_rate_limited"] == statuses.count(429)


def test_many_unregistered_hotkeys_share_one_budget(bridge):
    before = _auth_counts(bridge.url)
    signers = [Keypair.create_from_seed(os.urandom(32)) for _ in range(40)]
    t0 = time.monotonic()
    statuses = _flood(bridge.url, bridge.hotkey, signers, 200)
    elapsed = time.monotonic() - t0
    after = _auth_counts(bridge.url)
    reached = [s for s in statuses if s != 429]
    assert set(reached) <= {403}, statuses
    # 40 fresh hotkeys x a per-key burst of 2 would be 80: the shared bucket caps them all
    assert len(reached) <= SHARED_BURST + UNKNOWN_RATE * elapsed + 1, (len(reached), elapsed)
    assert after["signature_checked"] - before["signature_checked"] == len(reached)
    # a forged header of a registered hotkey is not budgeted as unknown: it is verified and refused
    body = b"{}"
    path = route("metrics").path
    forged = sign_headers(Keypair.create_from_uri("//mallory"), "GET", path, body, bridge.hotkey)
    forged["X-Bittensor-Hotkey"] = bridge.miner.ss58_address
    assert httpx.get(bridge.url + path, headers=forged, timeout=10).status_code == 401


def test_malformed_auth_headers_are_refused_before_any_signature_work(bridge):
    before = _auth_counts(bridge.url)
    path = route("metrics").path
    good = sign_headers(bridge.miner, "GET", path, b"", bridge.hotkey)
    bad_key = {**good, "X-Bittensor-Hotkey": "not an ss58 address!"}
    no_key = {k: v for k, v in good.items() if k != "X-Bittensor-Hotkey"}
    answers = [httpx.get(bridge.url + path, headers=h, timeout=10) for h in (bad_key, no_key, {})]
    assert [a.status_code for a in answers] == [401, 401, 401]
    assert [a.json()["message"].split(":")[0] for a in answers] == ["malformed", "malformed", "unsigned"]
    after = _auth_counts(bridge.url)
    assert after["signature_checked"] == before["signature_checked"]
    assert after["malformed"] - before["malformed"] == 3

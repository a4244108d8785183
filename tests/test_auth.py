"""Signed requests end to end: SignedClient -> uvicorn on 127.0.0.1 -> auth_dependency."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from bittensor import http_auth
from bittensor.sp_core import Keypair
from fastapi import Depends, FastAPI, HTTPException

from protocol.auth import (
    AuthFailed,
    SqliteNonceStore,
    auth_dependency,
    sign_headers,
    verify_request,
)
from protocol.client import BridgeError, SignedClient

ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")  # the server's hotkey
CHARLIE = Keypair.create_from_uri("//Charlie")
EVE = Keypair.create_from_uri("//Eve")  # signs correctly but is not registered
VALIDATORS = {ALICE.ss58_address}
REGISTERED = {ALICE.ss58_address, CHARLIE.ss58_address}


def _is_allowed(hotkey: str, role: str) -> bool:
    return hotkey in (VALIDATORS if role == "validator" else REGISTERED)


def _make_app(store: SqliteNonceStore) -> FastAPI:
    app = FastAPI()
    registered = auth_dependency(BOB.ss58_address, store, _is_allowed)
    validator = auth_dependency(BOB.ss58_address, store, _is_allowed, role="validator")
    flaky = {"left": 2}

    @app.get("/health")
    def health() -> dict:
        return {"hotkey": BOB.ss58_address}

    @app.post("/v1/echo")
    def echo(payload: dict, hotkey: str = Depends(registered)) -> dict:
        return {"hotkey": hotkey, "payload": payload}

    @app.get("/v1/validator/hoplog")
    def hoplog(round: int, hotkey: str, caller: str = Depends(validator)) -> dict:
        return {"round": round, "hotkey": hotkey, "caller": caller}

    @app.post("/v1/flaky")
    def flaky_route(caller: str = Depends(registered)) -> dict:
        if flaky["left"] > 0:
            flaky["left"] -= 1
            raise HTTPException(503, "try again")
        return {"ok": True}

    @app.post("/v1/bad")
    def bad(caller: str = Depends(registered)) -> dict:
        raise HTTPException(409, "hop 7 already done")

    return app


class _Server:
    def __init__(self, app: FastAPI) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture()
def server(tmp_path) -> Iterator[_Server]:
    store = SqliteNonceStore(tmp_path / "nonces.db", max_age=30.0)
    srv = _Server(_make_app(store))
    srv.db = tmp_path / "nonces.db"
    yield srv
    srv.stop()
    store.close()


def _send(srv: _Server, method: str, target: str, body: bytes, headers: dict) -> httpx.Response:
    h = dict(headers)
    if body:
        h["content-type"] = "application/json"
    return httpx.request(method, srv.url + target, content=body, headers=h, timeout=10)


def _assert_rejected(resp: httpx.Response, status: int, reason: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["detail"].startswith(reason), resp.json()


def test_round_trip_via_signed_client(server):
    with SignedClient(ALICE, server.url) as client:  # receiver fetched from /health
        assert client.receiver_ss58 == BOB.ss58_address
        out = client.post("/v1/echo", {"a": 1, "b": "x y"})
        assert out == {"hotkey": ALICE.ss58_address, "payload": {"a": 1, "b": "x y"}}
        # The query string is part of the signed target, exactly as httpx sends it.
        got = client.get("/v1/validator/hoplog", params={"round": 3, "hotkey": "5F a/b+c"})
        assert got == {"round": 3, "hotkey": "5F a/b+c", "caller": ALICE.ss58_address}


def test_tampered_body_rejected(server):
    headers = sign_headers(ALICE, "POST", "/v1/echo", b'{"a":1}', BOB.ss58_address)
    _assert_rejected(_send(server, "POST", "/v1/echo", b'{"a":2}', headers), 401, "bad_signature")


def test_wrong_path_rejected(server):
    headers = sign_headers(ALICE, "POST", "/v1/flaky", b'{"a":1}', BOB.ss58_address)
    _assert_rejected(_send(server, "POST", "/v1/echo", b'{"a":1}', headers), 401, "bad_signature")


def test_changed_query_rejected(server):
    target = "/v1/validator/hoplog?round=1&hotkey=x"
    headers = sign_headers(ALICE, "GET", target, b"", BOB.ss58_address)
    resp = _send(server, "GET", "/v1/validator/hoplog?round=2&hotkey=x", b"", headers)
    _assert_rejected(resp, 401, "bad_signature")
    ok = _send(server, "GET", target, b"", sign_headers(ALICE, "GET", target, b"",
                                                         BOB.ss58_address))
    assert ok.status_code == 200 and ok.json()["round"] == 1


def test_wrong_receiver_rejected(server):
    headers = sign_headers(ALICE, "POST", "/v1/echo", b"{}", CHARLIE.ss58_address)
    _assert_rejected(_send(server, "POST", "/v1/echo", b"{}", headers), 401, "wrong_receiver")


def test_stale_nonce_rejected(server):
    old = time.time_ns() - int(60e9)
    headers = http_auth.sign(ALICE, method="POST", path="/v1/echo", body=b"{}",
                             receiver_ss58=BOB.ss58_address, nonce_ns=old)
    resp = _send(server, "POST", "/v1/echo", b"{}", headers)
    _assert_rejected(resp, 401, "stale")
    assert "freshness window" in resp.json()["detail"]


def test_unsigned_and_malformed_rejected(server):
    _assert_rejected(_send(server, "POST", "/v1/echo", b"{}", {}), 401, "unsigned")
    headers = sign_headers(ALICE, "POST", "/v1/echo", b"{}", BOB.ss58_address)
    headers[http_auth.HEADER_SIGNATURE] = "0xnothex"
    _assert_rejected(_send(server, "POST", "/v1/echo", b"{}", headers), 401, "malformed")


def test_replay_rejected_also_after_verifier_restart(server):
    headers = sign_headers(ALICE, "POST", "/v1/echo", b"{}", BOB.ss58_address)
    assert _send(server, "POST", "/v1/echo", b"{}", headers).status_code == 200
    _assert_rejected(_send(server, "POST", "/v1/echo", b"{}", headers), 401, "replayed")
    # A second verifier process on the same SQLite file (a restarted bridge) remembers it.
    store2 = SqliteNonceStore(server.db, max_age=30.0)
    srv2 = _Server(_make_app(store2))
    try:
        _assert_rejected(_send(srv2, "POST", "/v1/echo", b"{}", headers), 401, "replayed")
        fresh = sign_headers(ALICE, "POST", "/v1/echo", b"{}", BOB.ss58_address)
        assert _send(srv2, "POST", "/v1/echo", b"{}", fresh).status_code == 200
    finally:
        srv2.stop()
        store2.close()


def test_not_allowed_hotkeys_get_403(server):
    with SignedClient(EVE, server.url, BOB.ss58_address) as eve:
        with pytest.raises(BridgeError) as err:
            eve.post("/v1/echo", {})
        assert err.value.status == 403 and "not_allowed" in err.value.detail
    with SignedClient(CHARLIE, server.url, BOB.ss58_address) as charlie:
        assert charlie.post("/v1/echo", {})["hotkey"] == CHARLIE.ss58_address
        with pytest.raises(BridgeError) as err:  # registered but no validator permit
            charlie.get("/v1/validator/hoplog", params={"round": 0, "hotkey": "x"})
        assert err.value.status == 403 and "validator" in err.value.detail


def test_client_retries_5xx_then_succeeds_and_raises_4xx_with_detail(server):
    with SignedClient(ALICE, server.url, BOB.ss58_address, backoff_s=0.01) as client:
        assert client.post("/v1/flaky", {}) == {"ok": True}  # 2 x 503, then 200
        with pytest.raises(BridgeError) as err:
            client.post("/v1/bad", {})
        assert err.value.status == 409 and err.value.detail == "hop 7 already done"


def test_client_gives_up_after_bounded_tries_on_connect_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here
    client = SignedClient(ALICE, f"http://127.0.0.1:{port}", BOB.ss58_address,
                          max_tries=3, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        client.post("/v1/echo", {})
    assert time.monotonic() - t0 < 5


def test_nonce_store_prunes_old_entries_and_keeps_recent(tmp_path):
    store = SqliteNonceStore(tmp_path / "n.db", max_age=1.0)
    now = time.time_ns()
    assert store.check_and_store("hk", now - int(120e9))
    assert store.check_and_store("hk", now)
    assert not store.check_and_store("hk", now)
    assert store.prune() == 1 and len(store) == 1
    assert not store.check_and_store("hk", now)


def test_nonce_store_is_safe_across_threads(tmp_path):
    store = SqliteNonceStore(tmp_path / "n.db")
    base = time.time_ns()
    wins: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [n for n in range(200) if store.check_and_store("hk", base + n)]
        with lock:
            wins.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == list(range(200))  # each nonce accepted exactly once


def test_verify_request_direct_reasons_and_throughput(tmp_path):
    store = SqliteNonceStore(tmp_path / "n.db")
    n = 300
    signed = [sign_headers(ALICE, "POST", "/p", b"x", BOB.ss58_address) for _ in range(n)]
    t0 = time.perf_counter()
    for h in signed:
        assert verify_request(h, b"x", method="POST", path="/p", receiver_ss58=BOB.ss58_address,
                              nonce_store=store) == ALICE.ss58_address
    rate = n / (time.perf_counter() - t0)
    assert rate > 1000, f"only {rate:.0f} verifications/s"
    with pytest.raises(AuthFailed) as err:
        verify_request(signed[0], b"x", method="POST", path="/p",
                       receiver_ss58=BOB.ss58_address, nonce_store=store)
    assert err.value.reason == "replayed" and err.value.status_code == 401

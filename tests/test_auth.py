"""Signed requests end to end through the bridge's own auth path: SignedClient / BridgeClient ->
uvicorn on 127.0.0.1 -> `bridge.web.mount` -> `bridge.auth.Authenticator` with the bridge's
`BufferedNonceStore` and metagraph `Registry` (over a fixed metagraph: the chain is the fake)."""
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
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse

from bridge.auth import Authenticator, RateLimiter, Registry
from bridge.nonces import BufferedNonceStore
from bridge.records import TransitionError
from bridge.web import mount
from protocol.auth import AuthFailed, sign_headers, verify_request
from protocol.chain.base import MetagraphView, NeuronInfo
from protocol import client as protocol_client
from protocol.client import BridgeError, SignedClient
from protocol.routes import Route

ALICE = Keypair.create_from_uri("//Alice")  # a validator
BOB = Keypair.create_from_uri("//Bob")  # the server's hotkey
CHARLIE = Keypair.create_from_uri("//Charlie")  # a registered miner
EVE = Keypair.create_from_uri("//Eve")  # signs correctly but is not registered


class _Chain:
    """A fixed metagraph: Alice holds a validator permit, Charlie is registered without one."""

    def metagraph(self) -> MetagraphView:
        def n(uid: int, kp: Keypair, permit: bool) -> NeuronInfo:
            return NeuronInfo(uid, kp.ss58_address, kp.ss58_address, 1.0, permit, 0, None, None)
        return MetagraphView(1, 0, 100, BOB.ss58_address, (n(0, ALICE, True), n(1, CHARLIE, False)))


class Echo(BaseModel):
    model_config = ConfigDict(extra="allow")


class Query(BaseModel):
    round: int
    hotkey: str


ECHO = Route("echo", "POST", "/t/echo", Echo, None, "registered")
HOPLOG = Route("hoplog", "GET", "/t/hoplog", Query, None, "validator")
MINE = Route("mine", "POST", "/t/mine", Echo, None, "miner")
FLAKY = Route("flaky", "POST", "/t/flaky", Echo, None, "registered")
BAD = Route("bad", "POST", "/t/bad", Echo, None, "registered")
HEALTH = Route("health", "GET", "/health", None, None, "public")


def _make_app(store: BufferedNonceStore, rate: float = 1000.0) -> FastAPI:
    app = FastAPI()
    flaky = {"left": 2}

    async def health(caller, req) -> JSONResponse:
        return JSONResponse({"hotkey": BOB.ss58_address})

    async def echo(caller, req):
        return JSONResponse({"hotkey": caller, "payload": req.model_dump()})

    async def hoplog(caller, req):
        return JSONResponse({"round": req.round, "hotkey": req.hotkey, "caller": caller})

    async def flaky_route(caller, req):
        if flaky["left"] > 0:
            flaky["left"] -= 1
            raise TransitionError("storage_error", "try again")
        return await echo(caller, req)

    async def bad(caller, req):
        raise TransitionError("already_reported", "hop 7 already done")

    auth = Authenticator(BOB.ss58_address, Registry(_Chain(), background=False), store,
                         RateLimiter(rate, rate))
    mount(app, (ECHO, HOPLOG, MINE, FLAKY, BAD, HEALTH), {
        "echo": echo, "hoplog": hoplog, "mine": echo, "flaky": flaky_route, "bad": bad,
        "health": health}, auth)
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
    store = BufferedNonceStore(tmp_path / "nonces.db", max_age=30.0)
    srv = _Server(_make_app(store))
    srv.db, srv.store = tmp_path / "nonces.db", store
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
    body = resp.json()
    assert body["error"] == "http_error" and body["message"].startswith(reason), body


def test_round_trip_via_signed_client(server):
    with SignedClient(ALICE, server.url) as client:  # receiver fetched from /health
        assert client.receiver_ss58 == BOB.ss58_address
        out = client.post(ECHO.path, {"a": 1, "b": "x y"})
        assert out == {"hotkey": ALICE.ss58_address, "payload": {"a": 1, "b": "x y"}}
        # The query string is part of the signed target, exactly as httpx sends it.
        got = client.get(HOPLOG.path, params={"round": 3, "hotkey": "5F a/b+c"})
        assert got == {"round": 3, "hotkey": "5F a/b+c", "caller": ALICE.ss58_address}


def test_tampered_body_rejected(server):
    headers = sign_headers(ALICE, "POST", ECHO.path, b'{"a":1}', BOB.ss58_address)
    _assert_rejected(_send(server, "POST", ECHO.path, b'{"a":2}', headers), 401, "bad_signature")


def test_wrong_path_rejected(server):
    headers = sign_headers(ALICE, "POST", FLAKY.path, b'{"a":1}', BOB.ss58_address)
    _assert_rejected(_send(server, "POST", ECHO.path, b'{"a":1}', headers), 401, "bad_signature")


def test_changed_query_rejected(server):
    target = HOPLOG.path + "?round=1&hotkey=x"
    headers = sign_headers(ALICE, "GET", target, b"", BOB.ss58_address)
    resp = _send(server, "GET", HOPLOG.path + "?round=2&hotkey=x", b"", headers)
    _assert_rejected(resp, 401, "bad_signature")
    ok = _send(server, "GET", target, b"", sign_headers(ALICE, "GET", target, b"",
                                                         BOB.ss58_address))
    assert ok.status_code == 200 and ok.json()["round"] == 1


def test_wrong_receiver_rejected(server):
    headers = sign_headers(ALICE, "POST", ECHO.path, b"{}", CHARLIE.ss58_address)
    _assert_rejected(_send(server, "POST", ECHO.path, b"{}", headers), 401, "wrong_receiver")


def test_stale_nonce_rejected(server):
    old = time.time_ns() - int(60e9)
    headers = http_auth.sign(ALICE, method="POST", path=ECHO.path, body=b"{}",
                             receiver_ss58=BOB.ss58_address, nonce_ns=old)
    resp = _send(server, "POST", ECHO.path, b"{}", headers)
    _assert_rejected(resp, 401, "stale")
    assert "freshness window" in resp.json()["message"]


def test_unsigned_and_malformed_rejected(server):
    _assert_rejected(_send(server, "POST", ECHO.path, b"{}", {}), 401, "unsigned")
    headers = sign_headers(ALICE, "POST", ECHO.path, b"{}", BOB.ss58_address)
    headers[http_auth.HEADER_SIGNATURE] = "0xnothex"
    _assert_rejected(_send(server, "POST", ECHO.path, b"{}", headers), 401, "malformed")


def test_replay_rejected_also_after_verifier_restart(server):
    headers = sign_headers(ALICE, "POST", ECHO.path, b"{}", BOB.ss58_address)
    assert _send(server, "POST", ECHO.path, b"{}", headers).status_code == 200
    _assert_rejected(_send(server, "POST", ECHO.path, b"{}", headers), 401, "replayed")
    # The bridge's group commit flushes the store; a restarted bridge on the file remembers it.
    server.store.flush()
    store2 = BufferedNonceStore(server.db, max_age=30.0)
    srv2 = _Server(_make_app(store2))
    try:
        _assert_rejected(_send(srv2, "POST", ECHO.path, b"{}", headers), 401, "replayed")
        fresh = sign_headers(ALICE, "POST", ECHO.path, b"{}", BOB.ss58_address)
        assert _send(srv2, "POST", ECHO.path, b"{}", fresh).status_code == 200
    finally:
        srv2.stop()
        store2.close()


def test_not_allowed_hotkeys_get_403(server):
    with SignedClient(EVE, server.url, BOB.ss58_address) as eve:
        with pytest.raises(BridgeError) as err:
            eve.post(ECHO.path, {})
        assert err.value.status == 403 and "not_allowed" in err.value.detail
    with SignedClient(CHARLIE, server.url, BOB.ss58_address) as charlie:
        assert charlie.post(ECHO.path, {})["hotkey"] == CHARLIE.ss58_address
        with pytest.raises(BridgeError) as err:  # registered but no validator permit
            charlie.get(HOPLOG.path, params={"round": 0, "hotkey": "x"})
        assert err.value.status == 403 and "validator" in err.value.detail


def test_client_retries_5xx_then_succeeds_and_raises_4xx_with_detail(server):
    with SignedClient(ALICE, server.url, BOB.ss58_address, backoff_s=0.01) as client:
        assert client.post(FLAKY.path, {"ok": 1})["payload"] == {"ok": 1}  # 2 x 503, then 200
        with pytest.raises(BridgeError) as err:
            client.post(BAD.path, {})
        assert err.value.status == 409 and "hop 7 already done" in err.value.detail


def test_client_gives_up_after_max_tries_with_bounded_backoff_on_connect_error(monkeypatch, caplog):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here
    client = SignedClient(ALICE, f"http://127.0.0.1:{port}", BOB.ss58_address,
                          max_tries=3, backoff_s=0.01)
    sleeps: list[float] = []
    monkeypatch.setattr(protocol_client.time, "sleep", sleeps.append)
    with caplog.at_level("WARNING", logger="protocol.client"), pytest.raises(httpx.ConnectError):
        client.post(ECHO.path, {})
    tries = [r.getMessage() for r in caplog.records if "(try " in r.getMessage()]
    assert [t.rsplit("(try ", 1)[1] for t in tries] == ["1/3)", "2/3)", "3/3)"]
    assert len(sleeps) == 2 and all(0 < s <= 0.01 * 2**i for i, s in enumerate(sleeps))  # no wait after the last


def test_a_validator_may_not_mine_and_a_flood_is_rate_limited(tmp_path):
    store = BufferedNonceStore(tmp_path / "n.db")
    srv = _Server(_make_app(store, rate=2.0))
    try:
        with SignedClient(ALICE, srv.url, BOB.ss58_address, max_tries=1) as alice:
            with pytest.raises(BridgeError) as err:
                alice.post(MINE.path, {})
            assert err.value.status == 403 and "validator_hotkey" in err.value.detail
        with SignedClient(CHARLIE, srv.url, BOB.ss58_address, max_tries=1) as charlie:
            assert charlie.post(MINE.path, {})["hotkey"] == CHARLIE.ss58_address
            with pytest.raises(BridgeError) as err:
                for _ in range(5):
                    charlie.post(MINE.path, {})
            assert err.value.status == 429 and "rate_limited" in err.value.detail
    finally:
        srv.stop()
        store.close()


def test_nonce_store_forgets_expired_entries_and_keeps_recent(tmp_path):
    store = BufferedNonceStore(tmp_path / "n.db", max_age=1.0)
    now = time.time_ns()
    assert store.check_and_store("hk", now - int(120e9))
    assert store.check_and_store("hk", now)
    assert not store.check_and_store("hk", now)
    assert store.flush() == 2 and len(store) == 1
    assert not store.check_and_store("hk", now)
    store.close()
    again = BufferedNonceStore(tmp_path / "n.db", max_age=1.0)
    assert len(again) == 1 and not again.check_and_store("hk", now)


def test_nonce_store_is_safe_across_threads(tmp_path):
    store = BufferedNonceStore(tmp_path / "n.db")
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


def test_verify_request_accepts_each_fresh_signature_once_and_names_each_refusal(tmp_path):
    store = BufferedNonceStore(tmp_path / "n.db")
    n = 300
    signed = [sign_headers(ALICE, "POST", "/p", b"x", BOB.ss58_address) for _ in range(n)]
    for h in signed:
        assert verify_request(h, b"x", method="POST", path="/p", receiver_ss58=BOB.ss58_address,
                              nonce_store=store) == ALICE.ss58_address
    with pytest.raises(AuthFailed) as err:
        verify_request(signed[0], b"x", method="POST", path="/p",
                       receiver_ss58=BOB.ss58_address, nonce_store=store)
    assert err.value.reason == "replayed" and err.value.status_code == 401

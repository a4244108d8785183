"""Hotkey-signed requests (btauth/1 via `bittensor.http_auth`): signing, verification, a
persistent SQLite nonce store, and the one FastAPI dependency that authenticates every route.

Error policy: SDK `AuthError`s are re-raised as our own `AuthFailed` with a short machine
`reason` (``unsigned``, ``malformed``, ``wrong_receiver``, ``stale``, ``bad_signature``,
``replayed``) and the SDK's message (safe to return to the caller: it never echoes secrets).
`NotAllowed` (a subclass) marks an authenticated caller that may not use the route (HTTP 403).
"""
from __future__ import annotations

import inspect
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from bittensor import http_auth
from bittensor.signing import resolve_signer

__all__ = [
    "AuthFailed",
    "NotAllowed",
    "SqliteNonceStore",
    "auth_dependency",
    "hotkey_of",
    "request_target",
    "sign_headers",
    "verify_request",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE = 30.0
ALLOWED_SKEW = http_auth.DEFAULT_ALLOWED_SKEW

_SDK_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (http_auth.MalformedAuth, "malformed"),
    (http_auth.WrongReceiver, "wrong_receiver"),
    (http_auth.StaleRequest, "stale"),
    (http_auth.BadSignature, "bad_signature"),
    (http_auth.ReplayedRequest, "replayed"),
)
# Inspected once: newer SDKs may take the crypto type as a verify() argument; 11.3 reads it
# from the X-Bittensor-Crypto header instead.
_VERIFY_TAKES_CRYPTO = "crypto_type" in inspect.signature(http_auth.verify).parameters


class AuthFailed(Exception):
    """A request failed authentication (HTTP 401); `reason` is a short code, str() explains."""

    status_code = 401

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class NotAllowed(AuthFailed):
    """An authenticated hotkey may not use this route (HTTP 403)."""

    status_code = 403


def hotkey_of(keypair: Any) -> str:
    """The hotkey ss58 of a bittensor Keypair, Wallet or Signer."""
    return resolve_signer(keypair, role="hotkey").ss58_address


def sign_headers(
    keypair: Any, method: str, path: str, body: bytes, receiver_ss58: str
) -> dict[str, str]:
    """btauth/1 headers for one request; `path` includes the query string exactly as sent."""
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError(f"body must be bytes, got {type(body).__name__}")
    if not receiver_ss58:
        raise ValueError("receiver_ss58 is required: requests are bound to the receiving hotkey")
    return http_auth.sign(
        keypair, method=method, path=path, body=bytes(body), receiver_ss58=receiver_ss58
    )


def verify_request(
    headers: Mapping[str, str],
    body: bytes,
    *,
    method: str,
    path: str,
    receiver_ss58: str,
    nonce_store: http_auth.NonceStore,
    max_age: float = DEFAULT_MAX_AGE,
    now_ns: int | None = None,
) -> str:
    """Verify a signed request and return the caller's hotkey ss58, or raise `AuthFailed`."""
    lowered = {k.lower() for k in headers}
    if http_auth.HEADER_HOTKEY.lower() not in lowered and (
        http_auth.HEADER_SIGNATURE.lower() not in lowered
    ):
        raise AuthFailed("unsigned", "request carries no btauth/1 signature headers")
    kwargs: dict[str, Any] = dict(
        method=method,
        path=path,
        self_hotkey_ss58=receiver_ss58,
        max_age=max_age,
        allowed_skew=ALLOWED_SKEW,
        require_receiver=True,
        nonce_store=nonce_store,
        now_ns=now_ns,
    )
    if _VERIFY_TAKES_CRYPTO:
        kwargs["crypto_type"] = None
    try:
        caller = http_auth.verify(headers, body, **kwargs)
    except http_auth.AuthError as exc:
        for cls, reason in _SDK_REASONS:
            if isinstance(exc, cls):
                raise AuthFailed(reason, str(exc)) from None
        raise AuthFailed("invalid", str(exc)) from None
    return caller.hotkey_ss58


class SqliteNonceStore:
    """Replay cache in a SQLite file (WAL): survives verifier restarts, shared by processes.

    One INSERT OR IGNORE per request; entries older than the window are pruned every
    `prune_every` inserts. Thread-safe (one connection behind a lock).
    """

    def __init__(self, path: str | os.PathLike[str], max_age: float = DEFAULT_MAX_AGE,
                 prune_every: int = 2000) -> None:
        if max_age <= 0:
            raise ValueError(f"max_age must be > 0 seconds, got {max_age}")
        self.path = os.fspath(path)
        self.max_age = float(max_age)
        # verify() checks this covers max_age + allowed_skew; keep a margin for clock jitter.
        self.retention = self.max_age + ALLOWED_SKEW + 5.0
        self.prune_every = max(1, int(prune_every))
        self._lock = threading.Lock()
        self._since_prune = 0
        self._conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False,
                                     isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS btauth_nonces ("
            " hotkey TEXT NOT NULL, nonce INTEGER NOT NULL, PRIMARY KEY (hotkey, nonce)"
            ") WITHOUT ROWID"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS btauth_nonces_by_nonce "
                           "ON btauth_nonces (nonce)")
        self.prune()

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        """Record (hotkey, nonce); True when new, False when it was seen before (a replay)."""
        with self._lock:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO btauth_nonces (hotkey, nonce) VALUES (?, ?)",
                (hotkey_ss58, int(nonce_ns)),
            )
            fresh = cur.rowcount == 1
            self._since_prune += 1
            if self._since_prune >= self.prune_every:
                self._prune_locked()
        return fresh

    def prune(self) -> int:
        """Delete entries older than the retention window; returns how many went."""
        with self._lock:
            return self._prune_locked()

    def _prune_locked(self) -> int:
        self._since_prune = 0
        cutoff = time.time_ns() - int(self.retention * 1e9)
        cur = self._conn.execute("DELETE FROM btauth_nonces WHERE nonce < ?", (cutoff,))
        return cur.rowcount

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM btauth_nonces").fetchone()[0])

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()


def request_target(scope: Mapping[str, Any]) -> str:
    """The request target (path plus ?query) exactly as the client sent it, from an ASGI scope."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope.get("root_path", "") + scope["path"]
    if "?" in path:  # some servers keep the query in raw_path
        return path
    query = scope.get("query_string") or b""
    return f"{path}?{query.decode('latin-1')}" if query else path


def auth_dependency(
    receiver_ss58: str,
    nonce_store: http_auth.NonceStore,
    is_allowed: Callable[[str, str], bool] | None = None,
    *,
    role: str = "registered",
    max_age: float = DEFAULT_MAX_AGE,
) -> Callable[..., Any]:
    """A FastAPI dependency returning the verified caller hotkey (401 bad auth, 403 not allowed).

    `is_allowed(hotkey, role)` decides access once the signature holds; build one dependency per
    route role (e.g. ``role="validator"``) from the same factory.
    """
    from fastapi import HTTPException, Request  # deferred: protocol users need not load FastAPI

    async def authenticate(request: Request) -> str:
        body = await request.body()
        try:
            hotkey = verify_request(
                request.headers, body, method=request.method,
                path=request_target(request.scope), receiver_ss58=receiver_ss58,
                nonce_store=nonce_store, max_age=max_age,
            )
        except AuthFailed as exc:
            log.info("auth rejected %s %s: %s", request.method, request.url.path, exc)
            raise HTTPException(status_code=exc.status_code, detail=str(exc)) from None
        if is_allowed is not None and not is_allowed(hotkey, role):
            log.info("auth forbidden %s for role %s on %s", hotkey, role, request.url.path)
            raise HTTPException(
                status_code=403,
                detail=f"not_allowed: hotkey {hotkey} may not use {role} routes "
                "(unregistered, or no validator permit)",
            )
        return hotkey

    # Real objects, not the strings `from __future__ import annotations` leaves: FastAPI
    # resolves string annotations in module globals, where Request is not imported.
    authenticate.__annotations__ = {"request": Request, "return": str}
    return authenticate

"""Hotkey-signed requests (btauth/1 via `bittensor.http_auth`): signing and verification.

The bridge's nonce store is `bridge.nonces.BufferedNonceStore` and its one authentication path
(signature, replay, role, rate limit) is `bridge.auth.Authenticator`.

Error policy: SDK `AuthError`s are re-raised as our own `AuthFailed` with a short machine
`reason` (``unsigned``, ``malformed``, ``wrong_receiver``, ``stale``, ``bad_signature``,
``replayed``) and the SDK's message (safe to return to the caller: it never echoes secrets).
`NotAllowed` (a subclass) marks an authenticated caller that may not use the route (HTTP 403).
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from bittensor import http_auth
from bittensor.signing import resolve_signer

__all__ = [
    "AuthFailed",
    "NotAllowed",
    "claimed_hotkey",
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


_SS58_ALPHABET = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def claimed_hotkey(headers: Mapping[str, str]) -> str:
    """The hotkey a request says it comes from (not yet verified): `AuthFailed` when the btauth/1
    headers are missing or the hotkey cannot be an ss58 address. No cryptography."""
    lowered = {k.lower(): v for k, v in headers.items()}
    hotkey = lowered.get(http_auth.HEADER_HOTKEY.lower())
    if hotkey is None:
        if http_auth.HEADER_SIGNATURE.lower() not in lowered:
            raise AuthFailed("unsigned", "request carries no btauth/1 signature headers")
        raise AuthFailed("malformed", f"missing {http_auth.HEADER_HOTKEY}")
    if not 40 <= len(hotkey) <= 50 or not set(hotkey) <= _SS58_ALPHABET:
        raise AuthFailed("malformed", f"{http_auth.HEADER_HOTKEY} is not an ss58 address")
    return hotkey


def request_target(scope: Mapping[str, Any]) -> str:
    """The request target (path plus ?query) exactly as the client sent it, from an ASGI scope."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope.get("root_path", "") + scope["path"]
    if "?" in path:  # some servers keep the query in raw_path
        return path
    query = scope.get("query_string") or b""
    return f"{path}?{query.decode('latin-1')}" if query else path

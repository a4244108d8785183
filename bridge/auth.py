"""The bridge's one authentication path: btauth/1 signature and freshness, the replay check
against the bridge's nonce store, metagraph role checks, and a per-hotkey rate limit.

`Authenticator.check` is called for every route, by the FastAPI routes and the fast path
alike; `protocol.auth.verify_request` does the signature and clock-skew checks."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Optional

from bridge.durable import note_nonce
from bridge.nonces import BufferedNonceStore
from bridge.records import TransitionError
from protocol.auth import AuthFailed, NotAllowed, verify_request

__all__ = ["Authenticator", "Registry", "RateLimiter"]

log = logging.getLogger(__name__)


class Registry:
    """Who may call: metagraph membership and validator permits, refreshed every `ttl` seconds by
    a background thread so a slow chain never stalls the event loop (requests read the last
    snapshot; a failed fetch keeps it and is logged)."""

    def __init__(self, chain: Any, ttl: float = 5.0, background: bool = True) -> None:
        self.chain, self.ttl = chain, ttl
        self._members: frozenset[str] = frozenset()
        self._validators: frozenset[str] = frozenset()
        self.refreshes = 0
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.refresh()
        if background:
            threading.Thread(target=self._loop, daemon=True, name="metagraph").start()

    def refresh(self) -> None:
        """Fetch the metagraph once and swap in the new snapshot."""
        mg = self.chain.metagraph()
        self._members = frozenset(n.hotkey for n in mg.neurons)
        self._validators = frozenset(n.hotkey for n in mg.neurons if n.validator_permit)
        self.refreshes += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.ttl)
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep serving from the last snapshot
                log.warning("metagraph refresh failed (keeping the last snapshot): %s", exc)
            self._stop.wait(min(1.0, self.ttl))  # kicks by unknown callers: at most one per second

    def close(self) -> None:
        """Stop the refresh thread."""
        self._stop.set()
        self._kick.set()

    def is_allowed(self, hotkey: str, role: str) -> bool:
        """Role "validator" needs a permit; every other role needs registration (never blocks)."""
        ok = hotkey in (self._validators if role == "validator" else self._members)
        if not ok:
            self._kick.set()  # maybe registered since the last snapshot: refresh soon
        return ok


class RateLimiter:
    """Per-hotkey token bucket."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Take one token for `key`; False when the bucket is empty."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            return ok


class Authenticator:
    """Signature, nonce, registration/permit and rate limit, in that order."""

    def __init__(self, hotkey: str, registry: Registry, nonces: BufferedNonceStore,
                 limiter: RateLimiter) -> None:
        self.hotkey, self.registry, self.nonces, self.limiter = hotkey, registry, nonces, limiter
        self.heard: dict[str, float] = {}
        """When each hotkey last made an accepted signed request (unix seconds; the dashboard's status)."""

    def check(self, headers: Mapping[str, str], body: bytes, method: str, target: str,
              role: str) -> Optional[str]:
        """The caller's hotkey (None on a public route), or `AuthFailed` / `TransitionError`."""
        if role == "public":
            return None
        try:
            caller = verify_request(headers, body, method=method, path=target,
                                    receiver_ss58=self.hotkey, nonce_store=self.nonces)
        except AuthFailed as exc:
            log.info("auth rejected %s %s: %s", method, target, exc)
            raise
        note_nonce(self.nonces.stored)  # answered only once this nonce is on disk
        reg = self.registry
        if not reg.is_allowed(caller, role):
            raise NotAllowed("not_allowed", f"hotkey {caller} may not use {role} routes "
                             "(unregistered, or no validator permit)")
        if role == "miner" and reg.is_allowed(caller, "validator"):
            raise NotAllowed("validator_hotkey", f"hotkey {caller} holds a validator permit and "
                             "may not serve as a miner; mine with a hotkey that has no validator "
                             "permit")
        if not self.limiter.allow(caller):
            raise TransitionError("rate_limited", f"too many requests from {caller}")
        self.heard[caller] = time.time()
        return caller

"""The bridge's one authentication path: cheap checks first (header shape, metagraph membership,
a budget for unregistered hotkeys), then the btauth/1 signature and freshness, the replay check
against the bridge's nonce store, role checks, and a per-hotkey rate limit.

`Authenticator.check` is called for every route, by the FastAPI routes and the fast path
alike; `protocol.auth.verify_request` does the signature and clock-skew checks. A signature
check costs far more than the rest of a refused request, so a hotkey the metagraph does not list
gets one only within `UnknownKeyBudget` (per hotkey and for all of them together); beyond it the
answer is 429 before any signature work. Registered hotkeys are limited only after their
signature verifies: a forged header must never drain a real miner's budget."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from typing import Any, Optional

from bridge.durable import note_nonce
from bridge.nonces import BufferedNonceStore
from bridge.records import TransitionError
from protocol.auth import AuthFailed, NotAllowed, claimed_hotkey, verify_request

__all__ = ["Authenticator", "Registry", "RateLimiter", "UnknownKeyBudget"]

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

    def is_member(self, hotkey: str) -> bool:
        """Listed in the last metagraph snapshot (no refresh kick: a cheap pre-signature check)."""
        return hotkey in self._members

    def is_allowed(self, hotkey: str, role: str) -> bool:
        """Role "validator" needs a permit; every other role needs registration (never blocks)."""
        ok = hotkey in (self._validators if role == "validator" else self._members)
        if not ok:
            self._kick.set()  # maybe registered since the last snapshot: refresh soon
        return ok


class RateLimiter:
    """Per-key token bucket; at most `max_keys` buckets are kept (the least recently used goes:
    random keys cannot grow it without bound)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Take one token for `key`; False when the bucket is empty."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return ok


class UnknownKeyBudget:
    """How many requests from hotkeys the metagraph does not list get a signature check: a small
    bucket per hotkey and one shared by all of them (`rate` per second, bursts of 2 x rate)."""

    def __init__(self, rate: float = 20.0, per_key_rate: float | None = None) -> None:
        per_key = per_key_rate if per_key_rate is not None else max(0.5, rate / 10.0)
        self.per_key = RateLimiter(per_key, max(2.0, 2 * per_key), max_keys=10_000)
        self.shared = RateLimiter(rate, max(1.0, 2 * rate), max_keys=1)

    def allow(self, hotkey: str) -> bool:
        """Take one token from the hotkey's bucket and the shared one; False when either is empty."""
        return self.per_key.allow(hotkey) and self.shared.allow("*")


class Authenticator:
    """Header shape, the unknown-key budget, signature, nonce, registration/permit and the
    per-hotkey rate limit, in that order. `counts` tallies outcomes (Prometheus reads it)."""

    def __init__(self, hotkey: str, registry: Registry, nonces: BufferedNonceStore,
                 limiter: RateLimiter, unknown: UnknownKeyBudget | None = None) -> None:
        self.hotkey, self.registry, self.nonces, self.limiter = hotkey, registry, nonces, limiter
        self.heard: dict[str, float] = {}
        """When each hotkey last made an accepted signed request (unix seconds; the dashboard's status)."""
        self.unknown = unknown or UnknownKeyBudget()
        # every key exists from the start: a scrape copying it never sees the dict change size
        self.counts: Counter[str] = Counter(dict.fromkeys(
            ("malformed", "unknown_rate_limited", "signature_checked", "auth_failed", "not_allowed",
             "rate_limited"), 0))

    def precheck(self, headers: Mapping[str, str], role: str) -> None:
        """The checks that need neither the body nor cryptography: header shape, and the budget of a
        hotkey the metagraph does not list (`AuthFailed` / `TransitionError` 429). The web layer
        runs it before it reads the body."""
        if role == "public":
            return
        try:
            claimed = claimed_hotkey(headers)
        except AuthFailed:
            self.counts["malformed"] += 1
            raise
        if not self.registry.is_member(claimed) and not self.unknown.allow(claimed):
            self.counts["unknown_rate_limited"] += 1
            raise TransitionError("rate_limited", "too many requests from hotkeys that are not "
                                  "registered on this subnet; register the hotkey first, then retry")

    def check(self, headers: Mapping[str, str], body: bytes, method: str, target: str,
              role: str) -> Optional[str]:
        """`precheck`, then `verify`: the caller's hotkey (None on a public route)."""
        self.precheck(headers, role)
        return self.verify(headers, body, method, target, role)

    def verify(self, headers: Mapping[str, str], body: bytes, method: str, target: str,
               role: str) -> Optional[str]:
        """Signature, nonce, role and rate limit of a request `precheck` let through: the caller's
        hotkey (None on a public route), or `AuthFailed` / `TransitionError`."""
        if role == "public":
            return None
        self.counts["signature_checked"] += 1
        try:
            caller = verify_request(headers, body, method=method, path=target,
                                    receiver_ss58=self.hotkey, nonce_store=self.nonces)
        except AuthFailed as exc:
            self.counts["auth_failed"] += 1
            log.info("auth rejected %s %s: %s", method, target, exc)
            raise
        note_nonce(self.nonces.stored)  # answered only once this nonce is on disk
        reg = self.registry
        if not reg.is_allowed(caller, role):
            self.counts["not_allowed"] += 1
            raise NotAllowed("not_allowed", f"hotkey {caller} may not use {role} routes "
                             "(unregistered, or no validator permit)")
        if role == "miner" and reg.is_allowed(caller, "validator"):
            raise NotAllowed("validator_hotkey", f"hotkey {caller} holds a validator permit and "
                             "may not serve as a miner; mine with a hotkey that has no validator "
                             "permit")
        if not self.limiter.allow(caller):
            self.counts["rate_limited"] += 1
            raise TransitionError("rate_limited", f"too many requests from {caller}")
        self.heard[caller] = time.time()
        return caller

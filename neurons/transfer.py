"""Object transfers through presigned URLs: bounded downloads, retried uploads, byte and time
accounting, and an optional emulated slow link so bandwidth effects show on one machine.

Objects move at the store's speed (docs/BENCHMARKS.md, "Hops that cost their compute ..."): they go
through urllib3 (http.client underneath), which sends a body from memory as it is and reads a
download of declared length into one buffer in one pass; httpx moved one large PUT several times
slower and copied every download three times over. Connections are kept alive in one pool shared
by every thread.
"""
from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import urllib3

__all__ = ["TransferError", "HashMismatch", "LinkEmulator", "TransferStats", "ObjectTransfer", "read_bounded"]

log = logging.getLogger(__name__)
_RETRYABLE = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class TransferError(RuntimeError):
    """A transfer failed for good (after retries, or with a non-retryable status)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class HashMismatch(TransferError):
    """The downloaded bytes are not the ones whose sha256 was recorded."""


def read_bounded(chunks: Iterable[bytes], max_bytes: int, what: str,
                 on_bytes: Callable[[int], None] | None = None) -> bytes:
    """The chunks joined; TransferError (413) as soon as they pass `max_bytes` (`on_bytes`: progress)."""
    out, n = [], 0
    for chunk in chunks:
        n += len(chunk)
        if n > max_bytes:
            raise TransferError(f"{what} exceeds {max_bytes} bytes", 413)
        out.append(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))
    return b"".join(out)


class LinkEmulator:
    """Serialises transfers through one emulated link of `mbps` with `latency_ms` per transfer."""

    def __init__(self, mbps: float = 0.0, latency_ms: float = 0.0):
        self.mbps, self.latency = mbps, latency_ms / 1000.0
        self._lock = threading.Lock()
        self._free_at = 0.0

    @property
    def active(self) -> bool:
        """Whether any emulation is configured."""
        return self.mbps > 0 or self.latency > 0

    def delay(self, nbytes: int) -> None:
        """Sleep as long as `nbytes` would take on the emulated link (queued behind earlier transfers)."""
        if not self.active:
            return
        wire = nbytes * 8 / (self.mbps * 1e6) if self.mbps > 0 else 0.0
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + wire
        time.sleep(max(0.0, start + wire - time.monotonic()) + self.latency)


@dataclass
class TransferStats:
    """Counters a status line and the benchmark read."""

    bytes_up: int = 0
    bytes_down: int = 0
    seconds_up: float = 0.0
    seconds_down: float = 0.0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, up: int = 0, down: int = 0, t_up: float = 0.0, t_down: float = 0.0) -> None:
        """Add one transfer's figures."""
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down
            self.seconds_up += t_up
            self.seconds_down += t_down


class ObjectTransfer:
    """GET and PUT against presigned URLs with retries and a hard size cap on downloads.

    `on_request(method, url, nbytes, t0, t1, ok, tries)`, when set, hears of every GET and PUT as
    it ends (the miner's request counters); it must be quick and must not raise."""

    def __init__(self, link: LinkEmulator | None = None, tries: int = 5, timeout: float = 60.0):
        self.link = link or LinkEmulator()
        self.tries = tries
        self.stats = TransferStats()
        # One keep-alive pool for every thread (hop downloads, uploads, the sync's pieces).
        self._pool = urllib3.PoolManager(num_pools=8, maxsize=32, retries=False,
                                         timeout=urllib3.Timeout(connect=min(10.0, timeout), read=timeout))
        self.on_bytes: Callable[[int], None] | None = None  # told each chunk a download receives (progress)
        self.on_request = None
        self._attempts = threading.local()

    def _observed(self, method: str, url: str, fn, sent: int = 0):
        """Run `fn` (one whole GET or PUT of `sent` bytes) and tell `on_request` how it went."""
        if self.on_request is None:
            return fn()
        t0, ok, result = time.monotonic(), False, None
        try:
            result = fn()
            ok = True
            return result
        finally:
            n = len(result) if isinstance(result, bytes) else sent
            self.on_request(method, url, n, t0, time.monotonic(), ok, getattr(self._attempts, "n", 1))

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._pool.clear()

    def get(self, url: str, max_bytes: int) -> bytes:
        """Download at most `max_bytes`; a larger object raises TransferError without reading it all."""
        return self._observed("GET", url, lambda: self._get(url, max_bytes))

    def _get(self, url: str, max_bytes: int) -> bytes:
        t0 = time.monotonic()
        data = self._retry(lambda: self._get_once(url, max_bytes), "GET")
        self.link.delay(len(data))
        self.stats.add(down=len(data), t_down=time.monotonic() - t0)
        return data

    def _get_once(self, url: str, max_bytes: int) -> bytes:
        r = self._pool.request("GET", url, preload_content=False, decode_content=False)
        done = False
        try:
            if r.status != 200:
                raise TransferError(f"GET failed with HTTP {r.status}", r.status)
            declared = r.headers.get("content-length")
            if declared is not None and int(declared) > max_bytes:
                raise TransferError(f"object is {declared} bytes, more than the {max_bytes} allowed", 413)
            if self.on_bytes is not None:  # progress wanted: read in chunks and tell each one
                data = read_bounded(r.stream(1 << 20), max_bytes, "object", self.on_bytes)
            else:  # with a declared length this is one buffer filled straight from the socket
                data = r.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise TransferError(f"object exceeds {max_bytes} bytes", 413)
            if declared is not None and len(data) != int(declared):
                raise urllib3.exceptions.ProtocolError(f"body ended after {len(data)} of {declared} bytes")
            done = True
            return data
        finally:
            if not done:
                r.close()  # a connection with an unread body must not serve the next request
            r.release_conn()

    def get_verified(self, url: str, sha256: str, max_bytes: int, what: str = "object") -> bytes:
        """`get`, then check the bytes against the recorded sha256 (HashMismatch if they differ)."""
        data = self.get(url, max_bytes=max_bytes)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HashMismatch(f"{what}: sha256 differs from the recorded one")
        return data

    def put(self, url: str, data: bytes) -> None:
        """Upload `data` to a presigned PUT URL (signed for exactly this length), sent from memory as is."""
        self._observed("PUT", url, lambda: self._put(url, data), sent=len(data))

    def _put(self, url: str, data: bytes) -> None:
        def once() -> None:
            r = self._pool.request("PUT", url, body=data, headers={"content-length": str(len(data))})
            if r.status not in (200, 201, 204):
                raise TransferError(f"PUT failed with HTTP {r.status}: "
                                    f"{r.data[:200].decode(errors='replace')}", r.status)

        t0 = time.monotonic()
        self.link.delay(len(data))
        self._retry(once, "PUT")
        self.stats.add(up=len(data), t_up=time.monotonic() - t0)

    def _retry(self, fn, what: str):
        delay = 0.2
        for attempt in range(1, self.tries + 1):
            self._attempts.n = attempt
            try:
                return fn()
            except TransferError as exc:
                if exc.status is None or (exc.status < 500 and exc.status != 429) or attempt == self.tries:
                    raise
                err = exc
            except _RETRYABLE as exc:
                if attempt == self.tries:
                    raise TransferError(f"{what} failed after {attempt} tries: {exc}") from exc
                err = exc
            self.stats.retries += 1
            log.debug("%s retry %d after %s", what, attempt, err)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

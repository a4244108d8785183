"""Object transfers through presigned URLs: bounded downloads, retried uploads, byte and time
accounting, and an optional emulated slow link so bandwidth effects show on one machine.

Large objects move at the store's speed (docs/BENCHMARKS.md, "Object transfers"): an upload streams
its body from memory in chunks (httpx sends one large `bytes` body several times slower), a
download is read straight into one buffer, and an object of `parallel_from` bytes or more is
fetched in ranged GETs of `part_bytes` (8 MiB), `parallel` at once (a presigned GET serves any range). Connections are
kept alive in one pool shared by every thread.
"""
from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field

from concurrent.futures import ThreadPoolExecutor

import httpx

__all__ = ["TransferError", "HashMismatch", "LinkEmulator", "TransferStats", "ObjectTransfer"]

log = logging.getLogger(__name__)
_RETRYABLE = (httpx.TransportError,)


class TransferError(RuntimeError):
    """A transfer failed for good (after retries, or with a non-retryable status)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class HashMismatch(TransferError):
    """The downloaded bytes are not the ones whose sha256 was recorded."""


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


class _NoRanges(Exception):
    """The store does not serve byte ranges of a presigned GET."""


CHUNK = 1 << 20  # bytes per write of a streamed upload
PART = 8 << 20  # bytes per ranged GET of a large object


def _chunks(data: bytes | bytearray | memoryview, size: int = CHUNK):
    """`data` as memoryview slices (no copies), for a streamed request body."""
    view = memoryview(data)
    for i in range(0, len(view), size):
        yield view[i:i + size]


class ObjectTransfer:
    """GET and PUT against presigned URLs with retries and a hard size cap on downloads."""

    def __init__(self, link: LinkEmulator | None = None, tries: int = 5, timeout: float = 60.0,
                 parallel: int = 4, parallel_from: int = 32 << 20, part_bytes: int = PART):
        self.link = link or LinkEmulator()
        self.tries = tries
        self.stats = TransferStats()
        self.parallel_from, self.part_bytes = parallel_from, part_bytes
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self._http = httpx.Client(timeout=timeout, limits=limits)
        self._ranges = ThreadPoolExecutor(parallel, thread_name_prefix="range") if parallel > 1 else None
        self._use_ranges = self._ranges is not None

    def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._ranges is not None:
            self._ranges.shutdown(wait=True)
        self._http.close()

    def get(self, url: str, max_bytes: int) -> bytes:
        """Download at most `max_bytes`; a larger object raises TransferError without reading it all."""
        t0 = time.monotonic()
        data = self._retry(lambda: self._get_once(url, max_bytes), "GET")
        self.link.delay(len(data))
        self.stats.add(down=len(data), t_down=time.monotonic() - t0)
        return data

    def _get_once(self, url: str, max_bytes: int) -> bytes:
        with self._http.stream("GET", url) as r:
            if r.status_code != 200:
                raise TransferError(f"GET failed with HTTP {r.status_code}", r.status_code)
            declared = r.headers.get("content-length")
            if declared is None:  # no length up front: read chunks, bounded
                return _read_unsized(r, max_bytes)
            size = int(declared)
            if size > max_bytes:
                raise TransferError(f"object is {size} bytes, more than the {max_bytes} allowed", 413)
            buf = bytearray(size)
            view = memoryview(buf)
            if not self._use_ranges or size < self.parallel_from:
                _read_into(r, view)
                return bytes(buf)
            # A large object: this response reads the first part while ranged GETs fetch the rest.
            cuts = list(range(0, size, self.part_bytes)) + [size]
            rest = [self._ranges.submit(self._get_range, url, view, a, b) for a, b in zip(cuts[1:-1], cuts[2:])]
            _read_into(r, view[:cuts[1]], first_part=True)
        try:
            for f in rest:
                f.result()
        except _NoRanges as exc:
            log.warning("%s: downloading whole objects from now on", exc)
            self._use_ranges = False
            return self._get_once(url, max_bytes)
        return bytes(buf)

    def _get_range(self, url: str, view: memoryview, start: int, end: int) -> None:
        with self._http.stream("GET", url, headers={"range": f"bytes={start}-{end - 1}"}) as r:
            if r.status_code not in (200, 206):
                raise TransferError(f"ranged GET failed with HTTP {r.status_code}", r.status_code)
            # rclone answers a range with 200 (and the range); a store that ignored it sends it all
            if not r.headers.get("content-range", "").startswith(f"bytes {start}-{end - 1}/"):
                raise _NoRanges(f"the store ignored a Range header (HTTP {r.status_code})")
            _read_into(r, view[start:end])

    def get_verified(self, url: str, sha256: str, max_bytes: int, what: str = "object") -> bytes:
        """`get`, then check the bytes against the recorded sha256 (HashMismatch if they differ)."""
        data = self.get(url, max_bytes=max_bytes)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HashMismatch(f"{what}: sha256 differs from the recorded one")
        return data

    def put(self, url: str, data: bytes) -> None:
        """Upload `data` to a presigned PUT URL (signed for exactly this length), streamed from memory."""
        def once() -> None:
            r = self._http.put(url, content=_chunks(data), headers={"content-length": str(len(data))})
            if r.status_code not in (200, 201, 204):
                raise TransferError(f"PUT failed with HTTP {r.status_code}: {r.text[:200]}", r.status_code)

        t0 = time.monotonic()
        self.link.delay(len(data))
        self._retry(once, "PUT")
        self.stats.add(up=len(data), t_up=time.monotonic() - t0)

    def _retry(self, fn, what: str):
        delay = 0.2
        for attempt in range(1, self.tries + 1):
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


def _read_into(r: httpx.Response, view: memoryview, first_part: bool = False) -> None:
    """Fill `view` from the response body; a body longer than it is an error, unless `first_part`
    (the rest of that response comes by ranged GETs: stop reading once the view is full)."""
    n = 0
    for chunk in r.iter_raw():
        k = len(chunk)
        if n + k >= len(view) and first_part:
            view[n:] = chunk[:len(view) - n]
            return
        if n + k > len(view):
            raise TransferError(f"object exceeds its declared {len(view)} bytes", 413)
        view[n:n + k] = chunk
        n += k
    if n != len(view):
        raise httpx.RemoteProtocolError(f"body ended after {n} of {len(view)} bytes")


def _read_unsized(r: httpx.Response, max_bytes: int) -> bytes:
    chunks, n = [], 0
    for chunk in r.iter_raw():
        n += len(chunk)
        if n > max_bytes:
            raise TransferError(f"object exceeds {max_bytes} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)

"""Replay cache for signed requests: checked in memory, persisted to SQLite in batches.

The bridge flushes pending nonces in the same group commit as the state changes the requests
caused, before any of them is answered. A nonce lost in a crash therefore belongs to a request
whose effect was lost too and which nobody saw answered: replaying it is the same as the
original arriving late. It is the bridge's only nonce store (`bridge.auth`).

`stored` counts nonces accepted so far and `durable` how many of them are on disk, so a request
that changed no state (a GET, a refused call) can still wait for its own nonce to be written
before it is answered (`bridge.durable`): otherwise it would replay after a restart.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

from protocol.auth import ALLOWED_SKEW, DEFAULT_MAX_AGE

__all__ = ["BufferedNonceStore", "RecentNonces"]

log = logging.getLogger(__name__)


class RecentNonces:
    """The nonces a process accepted within the retention window, in arrival (~ time) order:
    the in-memory replay check every nonce store starts with (not thread-safe: hold its
    store's lock)."""

    def __init__(self, max_age: float) -> None:
        if max_age <= 0:
            raise ValueError(f"max_age must be > 0 seconds, got {max_age}")
        self.retention = float(max_age) + ALLOWED_SKEW + 5.0
        self._seen: dict[tuple[str, int], None] = {}

    def cutoff(self) -> int:
        """Nonces (signing times, ns) older than this are stale anyway and may be forgotten."""
        return time.time_ns() - int(self.retention * 1e9)

    def add(self, key: tuple[str, int]) -> bool:
        """Remember (hotkey, nonce); False when it was already here (a replay)."""
        if key in self._seen:
            return False
        self._seen[key] = None
        return True

    def forget_expired(self) -> int:
        """Drop the nonces older than `cutoff()`; returns the cutoff used."""
        cutoff = self.cutoff()
        while self._seen:
            first = next(iter(self._seen))
            if first[1] >= cutoff:
                break
            del self._seen[first]
        return cutoff

    def __len__(self) -> int:
        return len(self._seen)


class BufferedNonceStore:
    """`check_and_store` in memory; `flush()` writes what is new in one transaction."""

    def __init__(self, path: str | os.PathLike[str], max_age: float = DEFAULT_MAX_AGE) -> None:
        self._recent = RecentNonces(max_age)
        self.path = os.fspath(path)
        self.retention = self._recent.retention
        self._lock = threading.Lock()
        self._pending: list[tuple[str, int]] = []
        self.stored = 0      # nonces accepted by check_and_store since start
        self.durable = 0     # of those, how many a flush has committed
        self._conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False,
                                     isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS btauth_nonces (hotkey TEXT NOT NULL, "
                           "nonce INTEGER NOT NULL, PRIMARY KEY (hotkey, nonce)) WITHOUT ROWID")
        self._conn.execute("CREATE INDEX IF NOT EXISTS btauth_nonces_by_nonce "
                           "ON btauth_nonces (nonce)")
        self._pruned_at = time.monotonic()
        cutoff = self._cutoff()
        self._conn.execute("DELETE FROM btauth_nonces WHERE nonce < ?", (cutoff,))
        for hk, n in self._conn.execute("SELECT hotkey, nonce FROM btauth_nonces ORDER BY nonce"):
            self._recent.add((hk, n))

    def _cutoff(self) -> int:
        return self._recent.cutoff()

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        """Record (hotkey, nonce); True when new, False for a replay."""
        key = (hotkey_ss58, int(nonce_ns))
        with self._lock:
            if not self._recent.add(key):
                return False
            self._pending.append(key)
            self.stored += 1
        return True

    def flush(self) -> int:
        """Persist new nonces and forget expired ones; returns how many were written."""
        with self._lock:
            pending, self._pending = self._pending, []
            upto = self.stored
            cutoff = self._recent.forget_expired()
        if not pending:
            self.durable = max(self.durable, upto)
            return 0
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany("INSERT OR IGNORE INTO btauth_nonces VALUES (?, ?)", pending)
            if time.monotonic() - self._pruned_at > 5.0:
                c.execute("DELETE FROM btauth_nonces WHERE nonce < ?", (cutoff,))
                self._pruned_at = time.monotonic()
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            with self._lock:
                self._pending[:0] = pending
            raise
        self.durable = max(self.durable, upto)
        return len(pending)

    def settle(self, tx: object = None) -> dict[int, Exception]:
        """Flush before the state commit (`BridgeService`): this process is the only one that
        sees these nonces, so nothing is refused here."""
        self.flush()
        return {}

    def settled(self, ok: bool) -> None:
        """Nothing to do: `settle` committed its own transaction."""

    def verdict(self, seq: int) -> None:
        """No refusals are decided after the in-memory check."""
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._recent)

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

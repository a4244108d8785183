"""The replay cache and the per-hotkey rate limit shared by every bridge process of a run.

Signed requests are checked in memory first (this process's replays and floods are refused at
once, as with SQLite: `bridge.nonces`, `bridge.auth.RateLimiter`). Their nonces are then
inserted in the same PostgreSQL transaction as the state changes of the batch they joined,
with the run's lock held (`BridgeService`), before any of those requests is answered:

- the table's primary key (hotkey, nonce) accepts a nonce once, whichever process saw it; a
  nonce another process inserted first comes back as a `replayed` refusal;
- the hotkey's accepted requests within the last `burst / rate` seconds, counted over every
  process, may not exceed `burst`: the shared form of the token bucket (same long-run rate,
  same burst); a request over it is refused `rate_limited` (its nonce is still spent).

Refused requests' transitions are not applied and their answers are replaced by the refusal
(`bridge.durable`)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

from bridge.records import TransitionError
from bridge.nonces import RecentNonces
from protocol.auth import DEFAULT_MAX_AGE, AuthFailed

__all__ = ["PgNonceStore"]

log = logging.getLogger(__name__)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS btauth_nonces (hotkey TEXT NOT NULL, nonce BIGINT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL, ok BOOLEAN NOT NULL, PRIMARY KEY (hotkey, nonce))",
    "CREATE INDEX IF NOT EXISTS btauth_nonces_rate ON btauth_nonces (hotkey, at)",
    "CREATE INDEX IF NOT EXISTS btauth_nonces_by_nonce ON btauth_nonces (nonce)",
)
_SCHEMA_LOCK = 0x6e6f6e6365  # "nonce"
# One statement: count each hotkey's accepted requests in the window, accept the batch's in
# order while under `burst`, insert every nonce (a used one is skipped), and say for each
# request whether it was inserted and accepted.
_SETTLE = """
WITH b AS (SELECT * FROM unnest(%s::text[], %s::bigint[], %s::float8[], %s::bigint[])
           AS b(hotkey, nonce, at, seq)),
used AS (SELECT hotkey, count(*) AS n FROM btauth_nonces
         WHERE hotkey IN (SELECT hotkey FROM b) AND ok AND at > %s GROUP BY hotkey),
dec AS (SELECT b.*, coalesce(used.n, 0)
               + row_number() OVER (PARTITION BY b.hotkey ORDER BY b.seq) <= %s AS ok
        FROM b LEFT JOIN used USING (hotkey)),
ins AS (INSERT INTO btauth_nonces (hotkey, nonce, at, ok)
        SELECT hotkey, nonce, at, ok FROM dec ON CONFLICT DO NOTHING RETURNING hotkey, nonce)
SELECT dec.seq, dec.ok, ins.hotkey IS NOT NULL, dec.hotkey
FROM dec LEFT JOIN ins USING (hotkey, nonce)
"""


class PgNonceStore:
    """`check_and_store` in memory; `settle(tx)` decides each pending nonce in the database."""

    def __init__(self, pool: Any, max_age: float = DEFAULT_MAX_AGE, rate: float = 200.0,
                 burst: float = 400.0, clock: Any = time.time) -> None:
        self._recent = RecentNonces(max_age)  # this process's: its replays are refused at once
        self.pool, self.clock = pool, clock
        self.burst, self.window = int(burst), float(burst) / float(rate)
        self._lock = threading.Lock()
        self._pending: list[tuple[int, str, int, float]] = []  # (seq, hotkey, nonce, at)
        self._settling: list[tuple[int, str, int, float]] = []
        self._upto = 0
        self._verdicts: dict[int, Exception] = {}
        self.stored = 0     # nonces accepted in memory since start
        self.durable = 0    # of those, how many a committed transaction decided
        self.refused = 0    # replays and floods caught in the database (other processes)
        self._pruned_at = 0.0
        with pool.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for stmt in _SCHEMA:
                conn.execute(stmt)

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        """Record (hotkey, nonce) locally; True when new here (the database has the last word)."""
        key = (hotkey_ss58, int(nonce_ns))
        with self._lock:
            if not self._recent.add(key):
                return False
            self.stored += 1
            self._pending.append((self.stored, key[0], key[1], self.clock()))
        return True

    def settle(self, tx: Any) -> dict[int, Exception]:
        """Insert the pending nonces in `tx` (the run's lock held); returns the refusals by
        sequence number. Call `settled(ok)` once `tx` committed or failed."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._settling, self._upto = batch, self.stored
            self._forget_expired()
        if not batch:
            return {}
        conn, now = tx.conn, self.clock()
        verdicts: dict[int, Exception] = {}
        for seq, ok, inserted, hk in conn.execute(_SETTLE, (
                [b[1] for b in batch], [b[2] for b in batch], [b[3] for b in batch],
                [b[0] for b in batch], now - self.window, self.burst)).fetchall():
            if not inserted:
                verdicts[seq] = AuthFailed("replayed", "nonce already used (seen by another "
                                           "bridge process)")
            elif not ok:
                verdicts[seq] = TransitionError("rate_limited", f"too many requests from {hk} "
                                                "(counted over every bridge process)")
        if now - self._pruned_at > 5.0:
            conn.execute("DELETE FROM btauth_nonces WHERE nonce < %s", (self._recent.cutoff(),))
            self._pruned_at = now
        with self._lock:
            self._verdicts.update(verdicts)
        return verdicts

    def settled(self, ok: bool) -> None:
        """The transaction of the last `settle` committed (`ok`) or not (the nonces wait for
        the next one)."""
        with self._lock:
            batch, self._settling = self._settling, []
            if ok:
                self.refused += sum(1 for b in batch if b[0] in self._verdicts)
                self.durable = max(self.durable, self._upto)
            else:
                for b in batch:
                    self._verdicts.pop(b[0], None)
                self._pending[:0] = batch

    def verdict(self, seq: int) -> Optional[Exception]:
        """The refusal decided for nonce `seq` (once), or None when it was accepted."""
        with self._lock:
            return self._verdicts.pop(seq, None)

    def _forget_expired(self) -> None:
        self._recent.forget_expired()
        if len(self._verdicts) > 100_000:  # answers never asked for (clients gone): drop oldest
            for seq in sorted(self._verdicts)[:50_000]:
                del self._verdicts[seq]

    def __len__(self) -> int:
        with self._lock:
            return len(self._recent)

    def close(self) -> None:
        """Nothing of its own to close (the pool belongs to the database)."""

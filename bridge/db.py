"""The bridge's persistence: one interface, two backends.

`open_database(url)` gives the SQLite backend (`Database`, a file path: the embedded default,
one bridge process) or, for a `postgresql://` URL, the PostgreSQL one (`bridge.db_postgres`,
several bridge processes serving one run). Both store the tables of `bridge.tables` and offer:

- `load(run, tun)`: the stored state (or a fresh one);
- `begin()`: a transaction (`Txn`): `fold(state)` brings the live state up to what is committed
  (PostgreSQL: under the run's lock, with the rows other processes wrote), transitions run,
  `commit(state, dirty, wake)` writes exactly what changed, all or nothing;
- `changes(seen)` and `fold_changes(state, seen, got)`: the same catch-up for a read, without
  the lock (PostgreSQL only: with SQLite the live state is always current);
- `done_hops`, `round_archive`, `prune`, `close`; `shared` says whether other processes write
  (reads must refresh), `blocking` whether a transaction waits on the network (run it off the
  event loop).

What changed comes from the records themselves (`State.dirty`, bridge.tracking) and, for the
global fields, from comparing the meta row with the one last written, so a transition never
has to say what it changed. Loading restores the current round fully; the `keep_rounds` rounds
before it stay on disk for validators' hop logs, older hop and sample rows are pruned when a
round starts (the per-round archive rows are kept), so the store stays bounded however long the
run. SQLite runs in WAL mode with synchronous=NORMAL and truncates its WAL when pruning.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from typing import Any, Optional

from bridge.records import Hop, State, Tunables
from bridge.tables import META, TABLES, fingerprint, rows_for, schema_sql
from protocol.messages import RunConfig

__all__ = ["Database", "open_database", "is_postgres_url", "KEEP_ROUNDS_MIN"]

log = logging.getLogger(__name__)
KEEP_ROUNDS_MIN = 1


def is_postgres_url(url: str) -> bool:
    """True for a libpq URL (postgresql:// or postgres://), False for a SQLite path."""
    return str(url).startswith(("postgresql://", "postgres://"))


def open_database(url: str | os.PathLike[str], keep_rounds: int = 8, **kw: Any) -> Any:
    """The backend for `url`: PostgreSQL for a libpq URL, else a SQLite file at that path."""
    if is_postgres_url(os.fspath(url)):
        from bridge.db_postgres import PostgresDatabase  # psycopg only where it is used
        return PostgresDatabase(os.fspath(url), keep_rounds, **kw)
    return Database(url, keep_rounds)


class _SqliteTxn:
    """A SQLite transaction: the live state is the only writer, so there is nothing to fold."""

    conn = None

    def __init__(self, db: "Database") -> None:
        self.db = db
        self.version = db.version

    def fold(self, st: State) -> State:
        """Nothing to catch up on: this process is the only writer."""
        return st

    def commit(self, st: State, dirty: dict, wake: Any = None) -> bool:
        """Write every changed record, and the meta row if it changed, in one transaction."""
        wrote = self.db.commit(st, dirty)
        self.version = self.db.version
        return wrote

    def rollback(self) -> None:
        """Nothing is open between transitions (commit is one BEGIN..COMMIT)."""


class Database:
    """One SQLite file (WAL, synchronous=NORMAL) holding a run's state: one bridge process."""

    shared = False     # no other process writes this file
    blocking = False   # a commit is a local file write: fine on the event loop

    def __init__(self, path: str | os.PathLike[str], keep_rounds: int = 8) -> None:
        if keep_rounds < KEEP_ROUNDS_MIN:
            raise ValueError(f"keep_rounds must be >= 1, got {keep_rounds}")
        self.path = self.url = os.fspath(path)
        self.keep_rounds = keep_rounds
        self._pruned_below = 0
        self._conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False,
                                     isolation_level=None)
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.execute(f"PRAGMA journal_size_limit={4 << 20}")
        for stmt in schema_sql({}, versioned=False):
            self._conn.execute(stmt)
        self._insert = {t.name: f"INSERT OR REPLACE INTO {t.name} ({', '.join(t.column_names)}) "
                                f"VALUES ({', '.join('?' * len(t.column_names))})"
                        for t in TABLES.values()}
        self._insert[META] = f"INSERT OR REPLACE INTO {META} (id, run, data) VALUES (0, ?, ?)"
        self.writes = 0   # rows written, for the benchmark
        self.version = 0  # commits so far (this process's view of the state's version)
        self._meta: Optional[tuple[bytes, list]] = None  # fingerprint of the globals last
                                                         # written or read

    def load(self, run: RunConfig, tun: Tunables) -> State:
        """The stored state of `run` (or a fresh one); refuses a DB that holds another run."""
        st = State(run=run, tun=tun)
        row = self._conn.execute(f"SELECT run, data FROM {META} WHERE id = 0").fetchone()
        if row is None:
            self._meta = None
            self.commit(st, {})
            return st
        stored = RunConfig.model_validate_json(row[0])
        if stored != run:
            raise ValueError(f"database {self.path} holds run {stored.run_id!r} with a different "
                             "config: use a new --db or the original run config")
        st.load_meta(json.loads(row[1]))
        self._meta = fingerprint(st.meta_dict())  # as loaded: unchanged -> no write
        for t in TABLES.values():
            if t.decode is None:
                continue
            q = f"SELECT data FROM {t.name}" + (" WHERE round = ?" if t.per_round else "")
            target = getattr(st, t.state_map)
            for (data,) in self._conn.execute(q, (st.round,) if t.per_round else ()):
                rec = t.decode(json.loads(data))
                target[rec.ident] = rec
        st.reindex()
        st.dirty = {}  # loading is not a change
        log.info("loaded run %s: round %d, phase %s, %d miners, %d hops", run.run_id, st.round,
                 st.phase, len(st.miners), len(st.hops))
        return st

    def begin(self) -> _SqliteTxn:
        """A transaction over the state (see the module docstring)."""
        return _SqliteTxn(self)

    def commit(self, st: State, dirty: dict) -> bool:
        """Write every changed record, and the meta row if it changed, in one transaction (all
        or nothing); returns whether anything was written."""
        meta_dict = st.meta_dict()
        fp = fingerprint(meta_dict)
        rows = rows_for(dirty)
        if fp != self._meta:
            rows[META] = [(st.run.model_dump_json(), json.dumps(meta_dict))]
        if not rows:
            return False
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for table, values in rows.items():
                    c.executemany(self._insert[table], values)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            self._meta = fp
            self.writes += sum(len(v) for v in rows.values())
            self.version += 1
        if st.round - self.keep_rounds > self._pruned_below:
            self.prune(st.round - self.keep_rounds)
        return True

    def prune(self, below_round: int) -> int:
        """Delete per-round rows of rounds before `below_round` and truncate the WAL; returns
        the rows deleted."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                n = sum(c.execute(f"DELETE FROM {t.name} WHERE round < ?", (below_round,)).rowcount
                        for t in TABLES.values() if t.per_round)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._pruned_below = below_round
        if n:
            log.info("pruned %d hop/sample rows of rounds before %d", n, below_round)
        return n

    def done_hops(self, round_: int, miner: Optional[str]) -> list[Hop]:
        """Completed hops of a round (optionally of one miner), in completion order."""
        q = "SELECT data FROM hops WHERE round = ? AND status = 'done'"
        args: tuple = (round_,)
        if miner is not None:
            q = "SELECT data FROM hops WHERE round = ? AND miner = ? AND status = 'done'"
            args = (round_, miner)
        hops = [Hop.from_row(json.loads(d)) for (d,) in self._conn.execute(q, args)]
        return sorted(hops, key=lambda h: (h.done_at, h.hop_id))

    def round_archive(self, round_: int) -> Optional[dict[str, Any]]:
        """States, pseudo-gradients and flagged hotkeys recorded for a round."""
        row = self._conn.execute("SELECT data FROM rounds WHERE round = ?", (round_,)).fetchone()
        return None if row is None else json.loads(row[0])

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

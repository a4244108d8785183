"""Thin SQLite persistence: each commit writes the changed records in one transaction.

What changed comes from the records themselves (`State.dirty`, bridge.tracking) and, for the
global fields, from comparing the meta row with the one last written, so a transition never
has to say what it changed.

Rows are JSON blobs keyed by id, with the few indexed columns that queries need (hops by round
and miner). Loading restores the current round fully; the `keep_rounds` rounds before it stay on
disk for validators' hop logs, older hop and sample rows are pruned when a round starts (the
per-round archive rows, one small row each, are kept) and the WAL is truncated, so the file stays
bounded however long the run.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import sqlite3
import threading
from typing import Any, Optional

from bridge.records import Hop, Miner, Sample, State, Tunables
from bridge.tracking import row_json
from protocol.messages import RunConfig

__all__ = ["Database"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 0), run TEXT NOT NULL,
                                 data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS miners (hotkey TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (sample_id INTEGER PRIMARY KEY, round INTEGER NOT NULL,
                                    data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hops (hop_id TEXT PRIMARY KEY, round INTEGER NOT NULL,
                                 miner TEXT, status TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS samples_round ON samples (round);
CREATE INDEX IF NOT EXISTS hops_round_miner ON hops (round, miner);
"""


_INSERT = {
    "meta": "INSERT OR REPLACE INTO meta (id, run, data) VALUES (0, ?, ?)",
    "miners": "INSERT OR REPLACE INTO miners VALUES (?, ?)",
    "samples": "INSERT OR REPLACE INTO samples VALUES (?, ?, ?)",
    "hops": "INSERT OR REPLACE INTO hops VALUES (?, ?, ?, ?, ?)",
    "rounds": "INSERT OR REPLACE INTO rounds VALUES (?, ?)",
}


def _rows(dirty: dict) -> dict[str, list[tuple]]:
    """table -> rows to write for the changed records (tables with none left out)."""
    rows: dict[str, list[tuple]] = {}
    for (kind, ident), rec in dirty.items():
        if kind == "miner":
            rows.setdefault("miners", []).append((ident, row_json(rec)))
        elif kind == "sample":
            rows.setdefault("samples", []).append((ident, rec.round, row_json(rec)))
        elif kind == "hop":
            rows.setdefault("hops", []).append(
                (ident, rec.round, rec.leased_to or rec.assigned_to, str(rec.status),
                 row_json(rec)))
        elif kind == "round":
            rows.setdefault("rounds", []).append((ident, json.dumps(rec, separators=(",", ":"))))
    return rows


def _fingerprint(meta: dict[str, Any]) -> tuple[bytes, list]:
    """An exact, cheap stand-in for the meta row's content, to tell whether it changed: a pickle
    (compared, never loaded; ~10x cheaper than the JSON) of all but the recent losses, which
    are most of the bytes and compare faster as a list."""
    rest = {k: v for k, v in meta.items() if k != "recent_losses"}
    return pickle.dumps(rest, protocol=5), meta["recent_losses"]


class Database:
    """One SQLite file (WAL, synchronous=NORMAL) holding a run's state."""

    def __init__(self, path: str | os.PathLike[str], keep_rounds: int = 8) -> None:
        if keep_rounds < 1:
            raise ValueError(f"keep_rounds must be >= 1, got {keep_rounds}")
        self.path = os.fspath(path)
        self.keep_rounds = keep_rounds
        self._pruned_below = 0
        self._conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False,
                                     isolation_level=None)
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.execute(f"PRAGMA journal_size_limit={4 << 20}")
        self._conn.executescript(_SCHEMA)
        self.writes = 0  # rows written, for the benchmark
        self._meta: Optional[tuple[bytes, list]] = None  # _fingerprint of the globals last
                                                         # written or read

    def load(self, run: RunConfig, tun: Tunables) -> State:
        """The stored state of `run` (or a fresh one); refuses a DB that holds another run."""
        st = State(run=run, tun=tun)
        row = self._conn.execute("SELECT run, data FROM meta WHERE id = 0").fetchone()
        if row is None:
            self._meta = None
            self.commit(st, {})
            return st
        stored = RunConfig.model_validate_json(row[0])
        if stored != run:
            raise ValueError(f"database {self.path} holds run {stored.run_id!r} with a different "
                             "config: use a new --db or the original run config")
        st.load_meta(json.loads(row[1]))
        self._meta = _fingerprint(st.meta_dict())  # as loaded: unchanged -> no write
        for (data,) in self._conn.execute("SELECT data FROM miners"):
            m = Miner.from_row(json.loads(data))
            st.miners[m.hotkey] = m
        for (data,) in self._conn.execute("SELECT data FROM samples WHERE round = ?", (st.round,)):
            sample = Sample.from_row(json.loads(data))
            st.samples[sample.sample_id] = sample
        for (data,) in self._conn.execute("SELECT data FROM hops WHERE round = ?", (st.round,)):
            h = Hop.from_row(json.loads(data))
            st.hops[h.hop_id] = h
        st.reindex()
        st.dirty = {}  # loading is not a change
        log.info("loaded run %s: round %d, phase %s, %d miners, %d hops", run.run_id, st.round,
                 st.phase, len(st.miners), len(st.hops))
        return st

    def commit(self, st: State, dirty: dict) -> bool:
        """Write every changed record, and the meta row if it changed, in one transaction (all
        or nothing); returns whether anything was written."""
        meta_dict = st.meta_dict()
        fingerprint = _fingerprint(meta_dict)
        rows = _rows(dirty)
        if fingerprint != self._meta:
            rows["meta"] = [(st.run.model_dump_json(), json.dumps(meta_dict))]
        if not rows:
            return False
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for table, values in rows.items():
                    c.executemany(_INSERT[table], values)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            self._meta = fingerprint
            self.writes += sum(len(v) for v in rows.values())
        if st.round - self.keep_rounds > self._pruned_below:
            self.prune(st.round - self.keep_rounds)
        return True

    def prune(self, below_round: int) -> int:
        """Delete hop and sample rows of rounds before `below_round` and truncate the WAL;
        returns the rows deleted."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                n = c.execute("DELETE FROM hops WHERE round < ?", (below_round,)).rowcount
                n += c.execute("DELETE FROM samples WHERE round < ?", (below_round,)).rowcount
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

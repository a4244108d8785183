"""The PostgreSQL backend: several bridge processes serve one run from one database.

Every transaction of the state (a batch of transitions) runs in one PostgreSQL transaction
that first locks the run's meta row (`SELECT ... FOR UPDATE`), so transitions of all processes
are applied one batch at a time, in one order. Every row carries the `version` of the commit
that wrote it (the meta row's counter, +1 per commit, under that lock); a process folds the rows
with a version above the one it last saw into its in-memory state (`bridge.refresh`) before
its transitions run, writes its own changes with the next version, notifies the other
processes of the long-polls it woke (`NOTIFY`, delivered at commit) and commits. A hop is
therefore leased once, a round closes once, and a process that dies mid-transaction leaves
nothing behind (its transaction is rolled back; the lock is released with its connection).

Reads (`refresh`) fold the same rows in from one statement (one snapshot) without the lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from typing import Any, Optional

from bridge.records import Hop, State, Tunables
from bridge.refresh import fold_meta, fold_records
from bridge.tables import META, TABLES, fingerprint, rows_for, schema_sql
from protocol.messages import RunConfig

__all__ = ["PostgresDatabase", "PgTxn", "channel_name", "DatabaseUnavailable", "redact",
           "first_line"]

log = logging.getLogger(__name__)
_TYPES = {"INTEGER": "BIGINT", "INTEGER NOT NULL": "BIGINT NOT NULL"}
_SCHEMA_LOCK = 0x7265_73626d  # advisory lock taken while creating tables ("resbm")
NOTIFY_MAX = 7900  # PostgreSQL refuses payloads of 8000 bytes and more


class DatabaseUnavailable(RuntimeError):
    """The database could not be reached or refused us (the message says which and why)."""


def channel_name(run_id: str) -> str:
    """The LISTEN/NOTIFY channel of a run (an identifier PostgreSQL accepts)."""
    return "resbm_" + hashlib.sha256(run_id.encode()).hexdigest()[:24]


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    from psycopg.conninfo import conninfo_to_dict
    try:
        d = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - a URL libpq cannot parse is shown as given (no password known)
        return url
    return f"postgresql://{d.get('user', '')}@{d.get('host', '')}:{d.get('port', '')}/{d.get('dbname', '')}"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libpq's are several lines long)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PgTxn:
    """One state transaction: opened with the run's lock held and the newer rows fetched."""

    def __init__(self, db: "PostgresDatabase", reload: bool = False) -> None:
        self.db, self.reload = db, reload
        self.conn = db.pool.getconn()
        try:
            self.seen = db.version
            self.version, self.meta, self.rows = db.fetch_since(self.conn, self.seen, lock=True)
        except BaseException:
            self._release(ok=False)
            raise

    def fold(self, st: State) -> State:
        """The live state brought up to what is committed (call under the service lock)."""
        st = self.db.fold(self.conn, st, self.version, self.meta, self.rows, self.reload)
        self.meta = self.rows = None
        return st

    def commit(self, st: State, dirty: dict, wake: Optional[dict] = None) -> bool:
        """Write the changes with the next version, notify, commit; returns whether it wrote."""
        db, c = self.db, self.conn
        try:
            meta_dict = st.meta_dict()
            fp = fingerprint(meta_dict)
            rows = rows_for(dirty)
            meta_changed = fp != db.meta_fp
            if not rows and not meta_changed:
                c.commit()  # releases the lock; the version stays
                self._release(ok=True)
                return False
            new = self.version + 1
            with c.pipeline(), c.cursor() as cur:  # one round trip for all of it, then COMMIT
                for table, values in rows.items():
                    cur.executemany(db.upsert[table], [(*v, new) for v in values])
                if meta_changed:
                    cur.execute(f"UPDATE {META} SET data = %s, version = %s, data_version = %s "
                                "WHERE id = 0", (json.dumps(meta_dict), new, new))
                else:
                    cur.execute(f"UPDATE {META} SET version = %s WHERE id = 0", (new,))
                if wake:
                    cur.execute("SELECT pg_notify(%s, %s)", (db.channel, db.wake_payload(new, wake)))
            c.commit()
        except BaseException:
            self._release(ok=False)
            raise
        db.meta_fp, db.version = fp, new
        db.writes += sum(len(v) for v in rows.values()) + int(meta_changed)
        self.version = new
        self._release(ok=True)
        db.maybe_prune(st.round)
        return True

    def rollback(self) -> None:
        """Abandon the transaction (the lock goes with it)."""
        self._release(ok=False)

    def _release(self, ok: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if not ok:
            try:
                conn.rollback()
            except Exception:  # noqa: BLE001 - a broken connection: the pool discards it
                pass
        self.db.pool.putconn(conn)


class PostgresDatabase:
    """A run's state in PostgreSQL (psycopg 3, pooled); see the module docstring."""

    shared = True    # other bridge processes commit too: fold their rows in before acting
    blocking = True  # transactions wait on the network and on the run's lock: off the loop

    def __init__(self, url: str, keep_rounds: int = 8, pool_size: int = 8,
                 connect_timeout: float = 10.0) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool
        if keep_rounds < 1:
            raise ValueError(f"keep_rounds must be >= 1, got {keep_rounds}")
        self.url, self.keep_rounds = url, keep_rounds
        self.path = redact(url)  # what messages show
        try:  # one direct attempt first: a clear one-line error instead of a pool timeout
            psycopg.connect(url, connect_timeout=int(connect_timeout)).close()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"PostgreSQL at {self.path}: {first_line(exc)}") from None
        self.pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=True,
                                   timeout=connect_timeout, name="resbm-bridge",
                                   kwargs={"options": "-c statement_timeout=60000"})
        self.writes = 0
        self.version = 0          # the highest commit version folded into the live state
        self.meta_fp: Optional[tuple[bytes, list]] = None
        self.channel = ""
        self.origin = f"{os.getpid()}-{os.urandom(4).hex()}"  # tells our own NOTIFYs apart
        self._pruned_below = 0
        self._run: Optional[RunConfig] = None
        self._tun: Optional[Tunables] = None
        cols = {t.name: t.column_names for t in TABLES.values()}
        self.upsert = {
            name: f"INSERT INTO {name} ({', '.join(c)}, version) VALUES "
                  f"({', '.join(['%s'] * (len(c) + 1))}) ON CONFLICT ({c[0]}) DO UPDATE SET "
                  + ", ".join(f"{x} = EXCLUDED.{x}" for x in (*c[1:], "version"))
            for name, c in cols.items()}
        loaded = [t for t in TABLES.values() if t.decode is not None]
        self._fetch_sql = " UNION ALL ".join(
            [f"SELECT '{META}', version, CASE WHEN data_version > %s THEN data END "
             f"FROM {META} WHERE id = 0"]
            + [f"SELECT '{t.kind}', version, data FROM {t.name} WHERE version > %s" for t in loaded])
        self._fetch_args = 1 + len(loaded)
        self._reader: Any = None  # autocommit connection for reads' catch-up
        self._reader_lock = threading.Lock()
        with self.pool.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for stmt in schema_sql(_TYPES, versioned=True):
                conn.execute(stmt)
            conn.execute("CREATE TABLE IF NOT EXISTS docs (name TEXT PRIMARY KEY, data TEXT NOT NULL)")

    # ---- loading and folding ---------------------------------------------------------------
    def load(self, run: RunConfig, tun: Tunables) -> State:
        """The stored state of `run` (or a fresh one); refuses a database holding another run."""
        self._run, self._tun = run, tun
        with self.pool.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            row = conn.execute(f"SELECT run FROM {META} WHERE id = 0").fetchone()
            if row is None:
                st = State(run=run, tun=tun)
                conn.execute(f"INSERT INTO {META} (id, run, data, version, data_version) "
                             "VALUES (0, %s, %s, 1, 1)",
                             (run.model_dump_json(), json.dumps(st.meta_dict())))
            self.channel = channel_name(run.run_id)
            return self._load(conn, run, tun)

    def _load(self, conn: Any, run: RunConfig, tun: Tunables) -> State:
        row = conn.execute(f"SELECT run, data, version FROM {META} WHERE id = 0").fetchone()
        stored = RunConfig.model_validate_json(row[0])
        if stored != run:
            raise ValueError(f"database {self.path} holds run {stored.run_id!r} with a different "
                             "config: use another database (or schema) or the original run config")
        st = State(run=run, tun=tun)
        st.load_meta(json.loads(row[1]))
        for t in TABLES.values():
            if t.decode is None:
                continue
            q = f"SELECT data FROM {t.name}" + (" WHERE round = %s" if t.per_round else "")
            target = getattr(st, t.state_map)
            for (data,) in conn.execute(q, (st.round,) if t.per_round else ()):
                rec = t.decode(json.loads(data))
                target[rec.ident] = rec
        st.reindex()
        st.dirty = {}
        self.meta_fp, self.version = fingerprint(st.meta_dict()), int(row[2])
        log.info("loaded run %s from %s at version %d: round %d, phase %s, %d miners, %d hops",
                 run.run_id, self.path, self.version, st.round, st.phase, len(st.miners),
                 len(st.hops))
        return st

    def fetch_since(self, conn: Any, seen: int, lock: bool) -> tuple[int, Optional[dict], list]:
        """(version, meta if it changed, [(kind, row)] changed) since version `seen`. `lock`
        first takes the run's lock (held until the transaction ends); the rows then come from
        one statement, run once the lock is ours, so from one snapshot that includes every
        commit before ours (both statements go in one round trip)."""
        if lock:
            with conn.pipeline():
                locked = conn.execute(f"SELECT version FROM {META} WHERE id = 0 FOR UPDATE")
                cur = conn.execute(self._fetch_sql, (seen,) * self._fetch_args)
            if locked.fetchone() is None:
                raise DatabaseUnavailable(f"database {self.path} has no run (meta row missing)")
        else:
            cur = conn.execute(self._fetch_sql, (seen,) * self._fetch_args)
        version, meta, rows = seen, None, []
        for kind, ver, data in cur.fetchall():
            if kind == META:
                version, meta = int(ver), (json.loads(data) if data is not None else None)
            else:
                rows.append((kind, json.loads(data)))
        return version, meta, rows

    def fold(self, conn: Any, st: State, version: int, meta: Optional[dict], rows: list,
             reload: bool = False) -> State:
        """`st` with the fetched changes folded in (a full reload when the round changed)."""
        if version == self.version and not reload and meta is None and not rows:
            return st
        if reload or (meta is not None and not fold_meta(st, meta)):
            return self._load(conn, st.run, st.tun)
        fold_records(st, rows)
        if meta is not None:
            self.meta_fp = fingerprint(st.meta_dict())
        self.version = max(self.version, version)
        return st

    def begin(self, reload: bool = False) -> PgTxn:
        """A locked transaction with the rows committed since we last looked."""
        return PgTxn(self, reload)

    def changes(self, seen: int) -> tuple[int, Optional[dict], list]:
        """What other processes committed since version `seen` (for reads: no lock taken; one
        statement, so one snapshot); fold it with `fold_changes` under the service lock."""
        import psycopg
        with self._reader_lock:
            if self._reader is None or self._reader.closed:
                self._reader = psycopg.connect(self.url, autocommit=True,
                                               options="-c statement_timeout=10000")
            try:
                return self.fetch_since(self._reader, seen, lock=False)
            except psycopg.OperationalError:
                self._reader.close()
                raise

    def fold_changes(self, st: State, seen: int, got: tuple[int, Optional[dict], list]) -> State:
        """`st` with the result of `changes(seen)` folded in, unless the state moved on since
        (a transaction of ours committed meanwhile: then it is at least as new)."""
        if self.version != seen:
            return st
        version, meta, rows = got
        if meta is not None and int(meta["round"]) != st.round:
            with self.pool.connection() as conn:  # a round change: reload it all
                return self._load(conn, st.run, st.tun)
        return self.fold(None, st, version, meta, rows)

    # ---- notifications, pruning, readers' queries --------------------------------------------
    def wake_payload(self, version: int, wake: dict) -> str:
        """The NOTIFY payload for the long-polls a commit woke (everyone when it is too long)."""
        targets = [[k, i] for k, i in wake.get("targets", ())]
        body = {"v": version, "o": self.origin, "a": bool(wake.get("all")), "t": targets}
        text = json.dumps(body, separators=(",", ":"))
        if len(text) > NOTIFY_MAX:
            text = json.dumps({"v": version, "o": self.origin, "a": True, "t": []})
        return text

    def maybe_prune(self, round_: int) -> None:
        """Prune once per round start (any process may; deleting twice is harmless)."""
        if round_ - self.keep_rounds > self._pruned_below:
            self.prune(round_ - self.keep_rounds)

    def prune(self, below_round: int) -> int:
        """Delete per-round rows of rounds before `below_round`; returns the rows deleted."""
        with self.pool.connection() as conn:
            n = sum(conn.execute(f"DELETE FROM {t.name} WHERE round < %s", (below_round,)).rowcount
                    for t in TABLES.values() if t.per_round)
        self._pruned_below = below_round
        if n:
            log.info("pruned %d hop/sample rows of rounds before %d", n, below_round)
        return n

    def done_hops(self, round_: int, miner: Optional[str]) -> list[Hop]:
        """Completed hops of a round (optionally of one miner), in completion order."""
        q = "SELECT data FROM hops WHERE round = %s AND status = 'done'"
        args: tuple = (round_,)
        if miner is not None:
            q += " AND miner = %s"
            args = (round_, miner)
        with self.pool.connection() as conn:
            hops = [Hop.from_row(json.loads(d)) for (d,) in conn.execute(q, args)]
        return sorted(hops, key=lambda h: (h.done_at, h.hop_id))

    def round_archive(self, round_: int) -> Optional[dict[str, Any]]:
        """States, pseudo-gradients and flagged hotkeys recorded for a round."""
        with self.pool.connection() as conn:
            row = conn.execute("SELECT data FROM rounds WHERE round = %s", (round_,)).fetchone()
        return None if row is None else json.loads(row[0])

    def read_doc(self, name: str) -> Optional[str]:
        """A shared document (the dashboard's validator reports), or None."""
        with self.pool.connection() as conn:
            row = conn.execute("SELECT data FROM docs WHERE name = %s", (name,)).fetchone()
        return None if row is None else row[0]

    def update_doc(self, name: str, fn: Any) -> None:
        """Replace document `name` by `fn(current text or None)`, locked against other writers."""
        with self.pool.connection() as conn:
            conn.execute("INSERT INTO docs VALUES (%s, '') ON CONFLICT DO NOTHING", (name,))
            (text,) = conn.execute("SELECT data FROM docs WHERE name = %s FOR UPDATE",
                                   (name,)).fetchone()
            conn.execute("UPDATE docs SET data = %s WHERE name = %s", (fn(text or None), name))

    def close(self) -> None:
        """Close the pool and the reader."""
        if self._reader is not None:
            self._reader.close()
        self.pool.close()

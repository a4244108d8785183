"""What the database stores, backend-neutral: one `Table` per journal kind of `State.dirty`
(the tracked records and the per-round archive rows), plus the meta row of global fields.

Both backends (`bridge.db` SQLite, `bridge.db_postgres` PostgreSQL) create, write and read
their tables from these specs only, so a new record kind is one `Table` here and no backend
change. Rows are JSON blobs keyed by id, with the few indexed columns that queries need.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Optional

from bridge.records import Hop, Miner, Sample
from bridge.tracking import row_json

__all__ = ["Table", "TABLES", "META", "rows_for", "fingerprint", "table_of", "schema_sql"]


@dataclass(frozen=True)
class Table:
    """How one kind of journal entry is stored.

    `columns`: indexed columns besides the key and the JSON `data` (name, SQL type), whose values
    `values(record)` gives; `decode`: JSON row -> record put back into the state on load (None:
    stored for readers only, never loaded); `per_round`: only the current round's rows are loaded
    (and rows of rounds older than `keep_rounds` are pruned)."""

    kind: str
    name: str
    key: tuple[str, str]
    columns: tuple[tuple[str, str], ...] = ()
    values: Callable[[Any], tuple] = lambda rec: ()
    encode: Callable[[Any], str] = row_json
    decode: Optional[Callable[[dict], Any]] = None
    state_map: str = ""         # the State attribute holding these records (id -> record)
    per_round: bool = False
    indexes: tuple[tuple[str, ...], ...] = ()

    def row(self, ident: Any, rec: Any) -> tuple:
        """The stored row: key, indexed columns, data."""
        return (ident, *self.values(rec), self.encode(rec))

    @property
    def column_names(self) -> tuple[str, ...]:
        """Every column in row order."""
        return (self.key[0], *(c for c, _ in self.columns), "data")


def _archive_json(rec: Any) -> str:
    return json.dumps(rec, separators=(",", ":"))


TABLES: dict[str, Table] = {t.kind: t for t in (
    Table("miner", "miners", ("hotkey", "TEXT"), decode=Miner.from_row, state_map="miners"),
    Table("sample", "samples", ("sample_id", "INTEGER"), (("round", "INTEGER NOT NULL"),),
          values=lambda s: (s.round,), decode=Sample.from_row, state_map="samples",
          per_round=True, indexes=(("round",),)),
    Table("hop", "hops", ("hop_id", "TEXT"),
          (("round", "INTEGER NOT NULL"), ("miner", "TEXT"), ("status", "TEXT NOT NULL")),
          values=lambda h: (h.round, h.leased_to or h.assigned_to, str(h.status)),
          decode=Hop.from_row, state_map="hops", per_round=True,
          indexes=(("round", "miner"),)),
    Table("round", "rounds", ("round", "INTEGER"), encode=_archive_json),
)}

# The meta row (id 0): the run config and the State's global fields as JSON.
META = "meta"


def table_of(kind: str) -> Table:
    """The table of a journal kind; a kind nobody declared is a programming error."""
    t = TABLES.get(kind)
    if t is None:
        raise KeyError(f"no table for record kind {kind!r}: declare it in bridge/tables.py")
    return t


def rows_for(dirty: dict) -> dict[str, list[tuple]]:
    """table name -> rows to write for the changed records (tables with none left out)."""
    rows: dict[str, list[tuple]] = {}
    for (kind, ident), rec in dirty.items():
        t = table_of(kind)
        rows.setdefault(t.name, []).append(t.row(ident, rec))
    return rows


def fingerprint(meta: dict[str, Any]) -> tuple[bytes, list]:
    """An exact, cheap stand-in for the meta row's content, to tell whether it changed: a pickle
    (compared, never loaded; ~10x cheaper than the JSON) of all but the recent losses, which
    are most of the bytes and compare faster as a list."""
    rest = {k: v for k, v in meta.items() if k != "recent_losses"}
    return pickle.dumps(rest, protocol=5), meta["recent_losses"]


def schema_sql(key_types: dict[str, str], versioned: bool) -> list[str]:
    """CREATE statements for the meta row and every table above (`key_types` maps
    the specs' portable types to the backend's; `versioned` adds the change-version column)."""
    ver = ", version BIGINT NOT NULL DEFAULT 0" if versioned else ""
    out = [f"CREATE TABLE IF NOT EXISTS {META} (id INTEGER PRIMARY KEY CHECK (id = 0), "
           f"run TEXT NOT NULL, data TEXT NOT NULL"
           + (", version BIGINT NOT NULL DEFAULT 0, data_version BIGINT NOT NULL DEFAULT 0"
              if versioned else "") + ")"]
    for t in TABLES.values():
        cols = ", ".join(f"{c} {key_types.get(ty, ty)}" for c, ty in t.columns)
        out.append(f"CREATE TABLE IF NOT EXISTS {t.name} ({t.key[0]} "
                   f"{key_types.get(t.key[1], t.key[1])} PRIMARY KEY, "
                   + (cols + ", " if cols else "") + f"data TEXT NOT NULL{ver})")
        for idx in t.indexes:
            out.append(f"CREATE INDEX IF NOT EXISTS {t.name}_{'_'.join(idx)} "
                       f"ON {t.name} ({', '.join(idx)})")
        if versioned:
            out.append(f"CREATE INDEX IF NOT EXISTS {t.name}_version ON {t.name} (version)")
    return out

"""Folding rows that another bridge process committed into this process's live state (pure).

Several bridge processes over one PostgreSQL database each keep the run's state in memory.
Before a transition runs, the process takes the run's lock and reads the rows committed since
it last looked (`bridge.db_postgres`); this module puts them into the state so that the
transition sees exactly what is committed, with the derived indexes (pools, queues, leases,
deadline heap) kept right. It decides nothing: a round change means a full reload instead.
"""
from __future__ import annotations

from typing import Any, Iterable

from bridge.records import Hop, State
from bridge.tables import TABLES
from protocol.lifecycle import HOP_OPEN

__all__ = ["fold_meta", "fold_records"]


def _hop_order(h: Hop) -> int:
    return int(h.hop_id.split("x")[1])


def fold_meta(st: State, meta: dict[str, Any]) -> bool:
    """Take the committed global fields; False (nothing changed) when they belong to another
    round: then the caller reloads everything instead."""
    if int(meta["round"]) != st.round:
        return False
    st.load_meta(meta)
    return True


def _fold_hops(st: State, hops: Iterable[Hop]) -> None:
    for hop in sorted(hops, key=_hop_order):  # pools keep creation order, as after a load
        old = st.hops.get(hop.hop_id)
        if old is not None and old.status in HOP_OPEN:
            st.unplace(old)
        st.hops[hop.hop_id] = hop
        if hop.status in HOP_OPEN:
            st.place(hop)


def fold_records(st: State, rows: Iterable[tuple[str, dict[str, Any]]]) -> int:
    """Replace the state's copies of the given (kind, JSON row) records; rows of other rounds
    (per-round kinds) and kinds the state does not hold are skipped. Returns rows taken."""
    by_kind: dict[str, list[Any]] = {}
    for kind, data in rows:
        t = TABLES[kind]
        if t.decode is None or (t.per_round and data.get("round") != st.round):
            continue
        by_kind.setdefault(kind, []).append(t.decode(data))
    taken = 0
    for kind, recs in by_kind.items():
        taken += len(recs)
        if kind == "hop":  # the one kind with derived indexes
            _fold_hops(st, recs)
            continue
        target = getattr(st, TABLES[kind].state_map)
        for rec in recs:
            target[rec.ident] = rec
    st.dirty, st.wake = {}, {}  # folding in what is committed is not a change of ours
    return taken

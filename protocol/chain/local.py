"""`LocalChain`: a subnet on a SQLite file (WAL), so separate processes share one local chain.

The block clock is wall time since genesis divided by `seconds_per_block`, plus an offset
that tests and tools move with `advance_blocks`. Validator permits go to the top-K hotkeys
by stake. `incentives()` is a per-epoch stake-weighted average of validators' weights, so a
local run shows who would earn what.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

from bittensor.intents.weights import clip_to_max_weight

from protocol.chain.base import (
    Chain,
    ChainFailure,
    MetagraphView,
    NeuronInfo,
    SetWeightsResult,
    coldkey_ss58,
    hotkey_ss58,
)

__all__ = ["LocalChain"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clock (
    id INTEGER PRIMARY KEY CHECK (id = 1), genesis REAL NOT NULL,
    seconds_per_block REAL NOT NULL, block_offset INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS subnets (
    netuid INTEGER PRIMARY KEY, tempo INTEGER NOT NULL, weights_rate_limit INTEGER NOT NULL,
    max_weight_limit REAL NOT NULL, max_validators INTEGER NOT NULL, max_uids INTEGER NOT NULL,
    owner_hotkey TEXT NOT NULL, owner_coldkey TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS neurons (
    netuid INTEGER NOT NULL, uid INTEGER NOT NULL, hotkey TEXT NOT NULL, coldkey TEXT NOT NULL,
    stake REAL NOT NULL DEFAULT 0, registered_at INTEGER NOT NULL,
    last_weights_block INTEGER, axon_ip TEXT, axon_port INTEGER,
    PRIMARY KEY (netuid, uid), UNIQUE (netuid, hotkey));
CREATE TABLE IF NOT EXISTS weights (
    netuid INTEGER NOT NULL, uid INTEGER NOT NULL, dest INTEGER NOT NULL, weight REAL NOT NULL,
    PRIMARY KEY (netuid, uid, dest));
"""


class LocalChain(Chain):
    """A `Chain` backed by one SQLite file; every process opening the file sees one chain."""

    def __init__(self, path: str | os.PathLike[str], netuid: int,
                 seconds_per_block: float = 12.0) -> None:
        if seconds_per_block <= 0:
            raise ValueError(f"seconds_per_block must be > 0, got {seconds_per_block}")
        self.path = os.fspath(path)
        self.netuid = int(netuid)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._tx() as db:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            db.execute("INSERT OR IGNORE INTO clock (id, genesis, seconds_per_block) "
                       "VALUES (1, ?, ?)", (time.time(), float(seconds_per_block)))

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _block(self, db: sqlite3.Connection) -> int:
        genesis, spb, offset = db.execute(
            "SELECT genesis, seconds_per_block, block_offset FROM clock WHERE id = 1").fetchone()
        return int(offset) + int(max(0.0, time.time() - genesis) // spb)

    def _subnet(self, db: sqlite3.Connection) -> tuple:
        row = db.execute("SELECT tempo, weights_rate_limit, max_weight_limit, max_validators, "
                         "max_uids, owner_hotkey, owner_coldkey FROM subnets WHERE netuid = ?",
                         (self.netuid,)).fetchone()
        if row is None:
            raise ChainFailure(f"subnet {self.netuid} does not exist in {self.path}; "
                               "create it first (python -m protocol.chain.local_cli create)")
        return row

    def _permits(self, db: sqlite3.Connection, max_validators: int) -> set[int]:
        rows = db.execute("SELECT uid FROM neurons WHERE netuid = ? AND stake > 0 "
                          "ORDER BY stake DESC, uid ASC LIMIT ?",
                          (self.netuid, max_validators)).fetchall()
        return {r[0] for r in rows}

    def _uid(self, db: sqlite3.Connection, hotkey: str) -> int | None:
        row = db.execute("SELECT uid FROM neurons WHERE netuid = ? AND hotkey = ?",
                         (self.netuid, hotkey)).fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # -- local administration ---------------------------------------------------------------

    def create_subnet(self, owner: Any, *, tempo: int = 360, weights_rate_limit: int = 100,
                      max_weight_limit: float = 1.0, max_validators: int = 64,
                      max_uids: int = 256) -> int:
        """Create this subnet with `owner` (keypair, wallet or ss58) as uid 0; returns netuid."""
        if not 0 < max_weight_limit <= 1:
            raise ValueError(f"max_weight_limit must be in (0, 1], got {max_weight_limit}")
        if tempo < 1 or weights_rate_limit < 0 or max_validators < 1 or max_uids < 1:
            raise ValueError("tempo, max_validators and max_uids must be >= 1 and "
                             "weights_rate_limit >= 0")
        hot = owner if isinstance(owner, str) else hotkey_ss58(owner)
        cold = owner if isinstance(owner, str) else coldkey_ss58(owner)
        with self._tx() as db:
            block = self._block(db)
            if db.execute("SELECT 1 FROM subnets WHERE netuid = ?", (self.netuid,)).fetchone():
                raise ChainFailure(f"subnet {self.netuid} already exists in {self.path}")
            db.execute("INSERT INTO subnets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (self.netuid, tempo, weights_rate_limit, max_weight_limit, max_validators,
                        max_uids, hot, cold, block))
            db.execute("INSERT INTO neurons (netuid, uid, hotkey, coldkey, registered_at) "
                       "VALUES (?, 0, ?, ?, ?)", (self.netuid, hot, cold, block))
        log.info("local chain: created subnet %d owned by %s", self.netuid, hot)
        return self.netuid

    def add_stake(self, hotkey: str, amount: float) -> float:
        """Add stake (TAO) to a registered hotkey; returns its new stake."""
        if not math.isfinite(amount) or amount <= 0:
            raise ValueError(f"stake amount must be a positive number, got {amount}")
        with self._tx() as db:
            self._subnet(db)
            if self._uid(db, hotkey) is None:
                raise ChainFailure(f"hotkey {hotkey} is not registered on subnet {self.netuid}")
            db.execute("UPDATE neurons SET stake = stake + ? WHERE netuid = ? AND hotkey = ?",
                       (float(amount), self.netuid, hotkey))
            return float(db.execute("SELECT stake FROM neurons WHERE netuid = ? AND hotkey = ?",
                                    (self.netuid, hotkey)).fetchone()[0])

    def advance_blocks(self, n: int) -> int:
        """Move the clock forward by `n` blocks; returns the new current block."""
        if n < 0:
            raise ValueError(f"cannot advance by a negative number of blocks ({n})")
        with self._tx() as db:
            db.execute("UPDATE clock SET block_offset = block_offset + ? WHERE id = 1", (int(n),))
            return self._block(db)

    def incentives(self) -> dict[int, float]:
        """Each uid's share of miner emission: stake-weighted mean of validators' weights."""
        with self._tx() as db:
            sub = self._subnet(db)
            permits = self._permits(db, sub[3])
            stakes = dict(db.execute("SELECT uid, stake FROM neurons WHERE netuid = ?",
                                     (self.netuid,)).fetchall())
            rows = db.execute("SELECT uid, dest, weight FROM weights WHERE netuid = ?",
                              (self.netuid,)).fetchall()
        shares = {uid: 0.0 for uid in stakes}
        voting = {uid for uid, _, _ in rows if uid in permits}
        total_stake = sum(stakes[v] for v in voting)
        if total_stake <= 0:
            return shares
        for uid, dest, weight in rows:
            if uid in voting and dest in shares:
                shares[dest] += stakes[uid] * weight / total_stake
        return shares

    # -- Chain interface ----------------------------------------------------------------------

    def current_block(self) -> int:
        """The current block number."""
        with self._lock:
            return self._block(self._db)

    def metagraph(self) -> MetagraphView:
        """The subnet's neurons at the current block."""
        with self._tx() as db:
            tempo, _, _, max_validators, _, owner, _ = self._subnet(db)
            block = self._block(db)
            permits = self._permits(db, max_validators)
            rows = db.execute(
                "SELECT uid, hotkey, coldkey, stake, registered_at, last_weights_block, axon_ip, "
                "axon_port FROM neurons WHERE netuid = ? ORDER BY uid", (self.netuid,)).fetchall()
        neurons = tuple(
            NeuronInfo(uid=uid, hotkey=hk, coldkey=ck, stake=float(stake),
                       validator_permit=uid in permits,
                       last_update=int(last if last is not None else reg),
                       axon_ip=ip, axon_port=port)
            for uid, hk, ck, stake, reg, last, ip, port in rows)
        return MetagraphView(netuid=self.netuid, block=block, tempo=int(tempo),
                             owner_hotkey=owner, neurons=neurons)

    def uid_of(self, hotkey: str) -> int | None:
        """The uid of a hotkey on this subnet, or None."""
        with self._lock:
            self._subnet(self._db)
            return self._uid(self._db, hotkey)

    def register(self, keypair: Any) -> int:
        """Register the keypair's hotkey (idempotent); returns its uid."""
        hot, cold = hotkey_ss58(keypair), coldkey_ss58(keypair)
        with self._tx() as db:
            max_uids = self._subnet(db)[4]
            existing = self._uid(db, hot)
            if existing is not None:
                return existing
            uid = db.execute("SELECT COALESCE(MAX(uid) + 1, 0) FROM neurons WHERE netuid = ?",
                             (self.netuid,)).fetchone()[0]
            if uid >= max_uids:
                raise ChainFailure(f"subnet {self.netuid} is full ({max_uids} uids)")
            db.execute("INSERT INTO neurons (netuid, uid, hotkey, coldkey, registered_at) "
                       "VALUES (?, ?, ?, ?, ?)", (self.netuid, uid, hot, cold, self._block(db)))
        log.info("local chain: registered %s as uid %d on subnet %d", hot, uid, self.netuid)
        return int(uid)

    def serve(self, keypair: Any, ip: str, port: int) -> None:
        """Publish the hotkey's axon endpoint."""
        import ipaddress

        ipaddress.ip_address(ip)  # raises ValueError naming the bad address
        if not 0 < int(port) < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        hot = hotkey_ss58(keypair)
        with self._tx() as db:
            self._subnet(db)
            if self._uid(db, hot) is None:
                raise ChainFailure(f"hotkey {hot} is not registered on subnet {self.netuid}")
            db.execute("UPDATE neurons SET axon_ip = ?, axon_port = ? WHERE netuid = ? AND "
                       "hotkey = ?", (ip, int(port), self.netuid, hot))

    def set_weights(self, keypair: Any, uids: list[int], weights: list[float],
                    version_key: int = 0) -> SetWeightsResult:
        """Normalise and store the hotkey's weights, honouring the rate limit and permits."""
        hot = hotkey_ss58(keypair)
        if len(uids) != len(weights):
            return SetWeightsResult("error", 0, f"{len(uids)} uids but {len(weights)} weights")
        if len(set(uids)) != len(uids):
            return SetWeightsResult("error", 0, "duplicate uids in weights")
        if any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
            return SetWeightsResult("error", 0, "weights must be finite, >= 0 and not all zero")
        with self._tx() as db:
            _, rate_limit, max_weight, max_validators, _, _, _ = self._subnet(db)
            block = self._block(db)
            row = db.execute("SELECT uid, last_weights_block FROM neurons WHERE netuid = ? "
                             "AND hotkey = ?", (self.netuid, hot)).fetchone()
            if row is None:
                return SetWeightsResult("not_registered", 0,
                                        f"hotkey {hot} is not registered on subnet {self.netuid}")
            uid, last = row
            if last is not None and block - last < rate_limit:
                left = rate_limit - (block - last)
                return SetWeightsResult("rate_limited", left,
                                        f"weights set {block - last} blocks ago; the rate limit "
                                        f"is {rate_limit} blocks, retry in {left}")
            if uid not in self._permits(db, max_validators):
                return SetWeightsResult("error", 0, f"uid {uid} holds no validator permit")
            known = {r[0] for r in db.execute("SELECT uid FROM neurons WHERE netuid = ?",
                                              (self.netuid,))}
            unknown = sorted(set(uids) - known)
            if unknown:
                return SetWeightsResult("error", 0, f"unknown uids {unknown[:10]}")
            pairs = [(u, w) for u, w in zip(uids, weights) if w > 0]
            norm = clip_to_max_weight([w for _, w in pairs], max_weight)
            db.execute("DELETE FROM weights WHERE netuid = ? AND uid = ?", (self.netuid, uid))
            db.executemany("INSERT INTO weights VALUES (?, ?, ?, ?)",
                           [(self.netuid, uid, u, w) for (u, _), w in zip(pairs, norm)])
            db.execute("UPDATE neurons SET last_weights_block = ? WHERE netuid = ? AND uid = ?",
                       (block, self.netuid, uid))
        return SetWeightsResult("ok", 0, f"set {len(pairs)} weights at block {block}")

    def weights_rate_limit(self) -> int:
        """Blocks a hotkey must wait between weight sets."""
        with self._lock:
            return int(self._subnet(self._db)[1])

    def blocks_since_last_update(self, hotkey: str) -> int | None:
        """Blocks since the hotkey last set weights (since registration if never)."""
        with self._lock:
            self._subnet(self._db)
            row = self._db.execute("SELECT registered_at, last_weights_block FROM neurons WHERE "
                                   "netuid = ? AND hotkey = ?", (self.netuid, hotkey)).fetchone()
            if row is None:
                return None
            return self._block(self._db) - (row[1] if row[1] is not None else row[0])

    def weights_of(self, hotkey: str) -> dict[int, float]:
        """The weights the hotkey set, as {uid: fraction}."""
        with self._lock:
            self._subnet(self._db)
            uid = self._uid(self._db, hotkey)
            if uid is None:
                return {}
            rows = self._db.execute("SELECT dest, weight FROM weights WHERE netuid = ? AND "
                                    "uid = ? ORDER BY dest", (self.netuid, uid)).fetchall()
        return {int(d): float(w) for d, w in rows}

    def owner_hotkey(self) -> str:
        """The subnet owner's hotkey."""
        with self._lock:
            return str(self._subnet(self._db)[5])

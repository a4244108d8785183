"""Merge-level adversaries under the sharded sync (run config `sync_mode: sharded`).

The pseudo-gradient cheats (`flip`, `huge`, `lazy`, `withhold`, `overwrite`) are the same classes
as in drills.merge_cheats, run on the sharded round. Two differ in what they attack:
`liar` is a merger that lies about the shards it is assigned (it votes, and uploads, an update of
its own making for each) and about the checkpoint; `nan` sends shards whose bytes decode to NaN
(the honest codec refuses to encode NaN, so it patches the bytes after encoding).
"""
from __future__ import annotations

import hashlib
import logging
import struct

from drills.merge_cheats import MERGE_CHEATS, merge_cheat
from neurons.round_merge import ReplicaMerge
from neurons.shard_round import ShardedMerge
from neurons.shard_sync import MergedShard, merged_key, sync_settings
from resbm.sync_state import pack_update

__all__ = ["SHARD_CHEATS", "sharded_cheat", "cheat_for"]

log = logging.getLogger("drills")


class _ShardLiar(ShardedMerge):
    """Votes for its own (shifted) update on every shard it merges, and for a checkpoint of its own
    (one bit changed). Both lies are deterministic, so two liars on a stage (one owner's sybils)
    vote the same bytes: the 2-of-3 collusion drill."""

    def vote(self, sha, blob):
        fake = blob[:-1] + bytes([blob[-1] ^ 1])
        log.warning("drill liar: voting checkpoint %s.. (one of its own)", hashlib.sha256(fake).hexdigest()[:10])
        return hashlib.sha256(fake).hexdigest(), fake

    def merged_shards(self, rnd, mine, sync):
        cfg = sync_settings(self.run)
        out = {}
        for s, ms in mine.items():
            vec = (ms.update if ms.update is not None else 0) + 0.01
            if not hasattr(vec, "numel"):
                out[s] = ms
                continue
            blob = pack_update(vec, ms.ref or 1.0, cfg.merged)
            sha = hashlib.sha256(blob).hexdigest()
            key = merged_key(self.run.run_id, rnd, self.worker.stage_index, s, sync.hotkey, sha)
            sync.transfer.put(sync.board.put_url(key, len(blob)), blob)
            out[s] = MergedShard(sha, key, vec, ms.ref, {}, len(blob))
            log.warning("drill liar: voting %s.. for shard %d (an update of its own)", sha[:10], s)
        return out


class _ShardNaN(ShardedMerge):
    """Uploads shards whose last fp32 (a block scale, or a value) is NaN."""

    def encode_piece(self, vec):
        blob = super().encode_piece(vec)
        return blob[:-4] + struct.pack("<f", float("nan"))


class _Remembering:
    """A Board that remembers every PUT grant it handed out (url, size)."""

    def __init__(self, board):
        self.board, self.grants = board, []

    def put_url(self, key, size):
        url = self.board.put_url(key, size)
        self.grants.append((url, size))
        return url

    def get_url(self, key):
        return self.board.get_url(key)


class _ShardOverwrite(ShardedMerge):
    """After each round's reports, re-PUTs garbage of the same size through every grant it used
    (pieces and merged updates), trying to change what the mergers and joiners read."""

    def _sync(self):
        sync, board = super()._sync()
        self._board = sync.board = _Remembering(sync.board)
        return sync, board

    def run_round(self, state, rnd):
        out = super().run_round(state, rnd)
        for url, size in getattr(self, "_board", _Remembering(None)).grants:
            try:
                self.transfer.put(url, b"\0" * size)
                log.warning("drill overwrite: clobbered a staged sync object (%d bytes)", size)
            except Exception as exc:  # refused is the desired outcome
                log.info("drill overwrite: refused (%s)", str(exc)[:120])
        return out


SHARD_CHEATS = {"liar": _ShardLiar, "nan": _ShardNaN, "overwrite": _ShardOverwrite}


def sharded_cheat(kind: str) -> type[ShardedMerge]:
    """The sharded round of a merge-level cheat (honest for other kinds)."""
    if kind in SHARD_CHEATS:
        return SHARD_CHEATS[kind]
    base = MERGE_CHEATS.get(kind)
    if base is None:
        return ShardedMerge
    return type(f"Sharded{base.__name__}", (base, ShardedMerge), {})


def cheat_for(kind: str, honest: type[ReplicaMerge]) -> type[ReplicaMerge]:
    """The merge-level cheat `kind` over the run's honest round end (neurons.sync_choice's `merge`)."""
    return sharded_cheat(kind) if issubclass(honest, ShardedMerge) else merge_cheat(kind)

"""Merge-level adversaries under the sharded sync (run config `sync_mode: sharded`).

The pseudo-gradient cheats (`flip`, `huge`, `lazy`, `withhold`, `overwrite`) are the same classes
as in drills.merge_cheats, run on the sharded round. Two differ in what they attack:
`liar` is a merger that lies about the shards it is assigned (it votes, and uploads, an update of
its own making for each); `nan` sends shards whose bytes decode to NaN (the honest codec refuses
to encode NaN, so it patches the bytes after encoding).
"""
from __future__ import annotations

import hashlib
import logging
import struct

from drills.merge_cheats import MERGE_CHEATS
from neurons.shard_round import ShardedMerge
from neurons.shard_sync import MergedShard, merged_key, sync_settings
from resbm.sync_state import pack_update

__all__ = ["SHARD_CHEATS", "sharded_cheat"]

log = logging.getLogger("drills")


class _ShardLiar(ShardedMerge):
    """Votes for its own (shifted) update on every shard it merges."""

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


SHARD_CHEATS = {"liar": _ShardLiar, "nan": _ShardNaN}


def sharded_cheat(kind: str) -> type[ShardedMerge]:
    """The sharded round of a merge-level cheat (honest for other kinds)."""
    if kind in SHARD_CHEATS:
        return SHARD_CHEATS[kind]
    base = MERGE_CHEATS.get(kind)
    if base is None:
        return ShardedMerge
    return type(f"Sharded{base.__name__}", (base, ShardedMerge), {})

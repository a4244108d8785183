"""Merge-level adversaries: replicas that lie in the round's sync (docs/SECURITY.md, one row each),
each a `RoundSync` with one hook changed, on every run's sync (whole-state runs included).

`flip` uploads its pseudo-gradient with the sign flipped; `huge` scales it by 1e6; `lazy` uploads
zeros; `nan` sends pieces whose bytes decode to NaN (the honest codec refuses to encode NaN, so it
patches the bytes after encoding); `liar` is a merger that votes, and uploads, an update of its own
making for each shard it merges, and a full state of its own in checkpoint rounds (both lies are
deterministic, so two liars on a stage, one owner's sybils, vote the same bytes); `overwrite`
re-PUTs garbage through every grant it used after each round (trying to change what it reported);
`withhold` never reports its pseudo-gradient (trying to hold the merge set open).
"""
from __future__ import annotations

import hashlib
import logging
import struct

import torch

from neurons.round_sync import RoundState, RoundSync
from neurons.shard_sync import MergedShard
from protocol.keys import UpdateKey
from resbm.sync_state import pack_update

__all__ = ["MERGE_CHEATS", "merge_cheat"]

log = logging.getLogger("drills")


class _Flip(RoundSync):
    def pseudo_gradient(self, state: RoundState) -> dict[str, torch.Tensor]:
        return {k: -v for k, v in super().pseudo_gradient(state).items()}


class _Huge(RoundSync):
    def pseudo_gradient(self, state: RoundState) -> dict[str, torch.Tensor]:
        return {k: v * 1e6 for k, v in super().pseudo_gradient(state).items()}


class _Lazy(RoundSync):
    def pseudo_gradient(self, state: RoundState) -> dict[str, torch.Tensor]:
        return {k: torch.zeros_like(v) for k, v in super().pseudo_gradient(state).items()}


class _NaN(RoundSync):
    """Uploads pieces whose last fp32 (a block scale, or a value) is NaN."""

    def encode_piece(self, vec: torch.Tensor) -> bytes:
        blob = super().encode_piece(vec)
        return blob[:-4] + struct.pack("<f", float("nan"))


class _Liar(RoundSync):
    """Votes its own (shifted) update on every shard it merges, and a full state of its own (one bit
    changed) in checkpoint rounds."""

    def state_vote(self, sha: str, blob: bytes) -> tuple[str, bytes]:
        fake = blob[:-1] + bytes([blob[-1] ^ 1])
        log.warning("drill liar: voting checkpoint %s.. (one of its own)", hashlib.sha256(fake).hexdigest()[:10])
        return hashlib.sha256(fake).hexdigest(), fake

    def merged_shards(self, rnd: int, mine: dict[int, MergedShard]) -> dict[int, MergedShard]:
        out = {}
        for s, ms in mine.items():
            if ms.update is None:  # nothing usable to shift: vote the honest "keep"
                out[s] = ms
                continue
            vec = ms.update + 0.01
            blob = pack_update(vec, ms.ref or 1.0, self.cfg.merged)
            sha = hashlib.sha256(blob).hexdigest()
            key = UpdateKey(self.run.run_id, rnd, self.worker.stage_index, s, self.sync.hotkey, sha).final
            self.transfer.put(self.board.put_url(key, len(blob)), blob)
            out[s] = MergedShard(sha, key, vec, ms.ref, {}, len(blob))
            log.warning("drill liar: voting %s.. for shard %d (an update of its own)", sha[:10], s)
        return out


class _Remembering:
    """A Board that remembers every PUT grant it handed out (url, size)."""

    def __init__(self, board):
        self.board, self.grants = board, []

    def put_url(self, key: str, size: int) -> str:
        url = self.board.put_url(key, size)
        self.grants.append((url, size))
        return url

    def get_url(self, key: str) -> str:
        return self.board.get_url(key)


class _Overwrite(RoundSync):
    """After each round's reports, re-PUTs garbage of the same size through every grant it used
    (pieces, merged updates, the full state), trying to change what mergers and joiners read."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sync.board = self._grants = _Remembering(self.board)

    def state_grant(self, rnd: int, sha: str, size: int):
        grant = super().state_grant(rnd, sha, size)
        self._grants.grants.append((grant.put_url, size))
        return grant

    def run_round(self, state, rnd):
        out = super().run_round(state, rnd)
        for url, size in self._grants.grants:
            try:
                self.transfer.put(url, b"\0" * size)
                log.warning("drill overwrite: clobbered a staged object (%d bytes)", size)
            except Exception as exc:  # refused is the desired outcome
                log.info("drill overwrite: refused (%s)", str(exc)[:120])
        self._grants.grants.clear()
        return out


class _Withhold(RoundSync):
    """Works every hop but never reports its pseudo-gradient, hoping to hold the merge open."""

    def run_round(self, state, rnd):
        log.warning("drill withhold: not reporting round %d's pseudo-gradient", rnd)
        return state, None


MERGE_CHEATS = {"liar": _Liar, "flip": _Flip, "huge": _Huge, "nan": _NaN, "overwrite": _Overwrite,
                "lazy": _Lazy, "withhold": _Withhold}


def merge_cheat(kind: str) -> type[RoundSync]:
    """The RoundSync of a merge-level cheat (the honest one for other kinds)."""
    return MERGE_CHEATS.get(kind, RoundSync)

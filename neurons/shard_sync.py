"""A replica's part in the sharded, compressed, streamed sync of one round.

1. `upload`: the pseudo-gradient goes up shard by shard, each shard encoded with the run's codec
   (one shard in memory at a time); the sha256 of every shard is what the replica reports.
2. `merge`: for each shard the assignment gives it, the replica downloads every replica's piece
   of that shard (verified against the reported sha256), decodes, screens and robustly merges it
   (resbm.shard_merge), encodes the merged update and uploads it; its sha256 is its vote.
3. `apply`: once each shard's merged update is decided (a strict majority of its mergers, or a
   validator), the replica applies the outer step shard by shard, downloading only the shards it
   did not merge itself. No state goes on the wire except the full checkpoint every K rounds.

Peak memory beyond the replica's own theta and momentum is one shard's R decoded pieces
(plus a column chunk of the sort) and the replica's own encoded pieces, so it does not grow with R.

Transfers overlap compute: a shard's PUT runs while the next shard encodes (or merges), and the
pieces of a shard download in parallel. A replica that merges a shard alone (a stage's only
replica) reads its own piece from memory instead of downloading it back; where other mergers
read the stored piece it does too, so a piece the store altered is left out by every merger alike.

Object keys are content-addressed and name the writer; where they come from (a bridge grant or,
in the benchmark, the bridge's own signer) is the `Board`'s business.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from protocol.run_config import RunConfig
from protocol.keys import PieceKey, UpdateKey
from resbm.outer import OuterError
from resbm.robust_merge import MergeParams
from resbm.shard_merge import ShardMerge, apply_shard, merge_shard
from resbm.shards import ShardLayout, layout, take
from resbm.sync_codec import Codec, decode, encode, encoded_size
from resbm.sync_state import fp32, pack_update, unpack_update, update_size
from neurons.copies import first_good_copy
from neurons.merge_compute import merge_params
from neurons.transfer import HashMismatch, ObjectTransfer, TransferError

__all__ = ["SyncSettings", "sync_settings", "Board", "Piece", "pg_key", "merged_key",
           "strict_majority", "ReplicaSync", "read_update"]


@dataclass(frozen=True)
class SyncSettings:
    """The run's sync knobs, resolved: codecs, shard count, mergers per shard, checkpoint period."""

    pg: Codec
    merged: Codec
    shards: int
    mergers: int
    checkpoint_every: int
    params: MergeParams

    def layout(self, shapes: Mapping[str, Sequence[int]]) -> ShardLayout:
        """The stage's shard layout (block-aligned)."""
        return layout(shapes, self.shards, self.pg.block)


def sync_settings(run: RunConfig) -> SyncSettings:
    """SyncSettings from a RunConfig."""
    return SyncSettings(Codec(run.sync_codec, run.sync_block), Codec(run.sync_merged_codec, run.sync_block),
                        run.sync_shards, run.sync_mergers, run.checkpoint_every, merge_params(run))


class Board(Protocol):
    """Presigned URLs for the sync's objects."""

    def put_url(self, key: str, size: int) -> str: ...
    def get_url(self, key: str) -> str: ...


@dataclass(frozen=True)
class Piece:
    """One replica's reported pseudo-gradient: hotkey, verified samples, sha256 per shard."""

    hotkey: str
    samples: int
    shas: tuple[str, ...]


def pg_key(prefix: str, rnd: int, stage: int, hotkey: str, shard: int, sha: str) -> str:
    """Key of a replica's pseudo-gradient shard (`prefix`: the run id)."""
    return PieceKey(prefix, rnd, stage, hotkey, shard, sha).final


def merged_key(prefix: str, rnd: int, stage: int, shard: int, hotkey: str, sha: str) -> str:
    """Key of a merger's copy of a merged shard (`prefix`: the run id)."""
    return UpdateKey(prefix, rnd, stage, shard, hotkey, sha).final


def strict_majority(votes: Mapping[str, str], mergers: Sequence[str]) -> str | None:
    """The sha256 a strict majority of the shard's mergers voted for (None: a dispute)."""
    counted = Counter(sha for h, sha in votes.items() if h in set(mergers))
    for sha, n in counted.most_common(1):
        if 2 * n > len(mergers):
            return sha
    return None


@dataclass
class MergedShard:
    """A shard this replica merged: its vote (sha), key, decoded update and new ref norm."""

    sha: str
    key: str
    update: torch.Tensor | None
    ref: float | None
    excluded: dict[str, str] = field(default_factory=dict)
    size: int = 0


class ReplicaSync:
    """One replica's sync for one stage."""

    def __init__(self, transfer: ObjectTransfer, board: Board, cfg: SyncSettings, prefix: str,
                 hotkey: str, stage: int, encoder=None, fetchers: int = 4,
                 device: torch.device | str = "cpu"):
        self.transfer, self.board, self.cfg = transfer, board, cfg
        self.prefix, self.hotkey, self.stage = prefix, hotkey, stage
        self.encoder = encoder or (lambda vec: encode(vec, self.cfg.pg))  # drills send other bytes
        self.fetchers = fetchers
        self.device = torch.device(device)  # where decoding, merging and the outer step run
        self.own: dict[int, tuple[str, bytes]] = {}  # shard -> (sha256, bytes) of our uploaded piece
        self._alone: set[int] = set()  # shards we merge without any other merger

    def upload(self, rnd: int, pg: Mapping[str, torch.Tensor], lay: ShardLayout) -> tuple[str, ...]:
        """Encode and PUT the pseudo-gradient shard by shard; returns the sha256 per shard."""
        return tuple(sha for sha, _ in self.upload_sized(rnd, pg, lay))

    def upload_sized(self, rnd: int, pg: Mapping[str, torch.Tensor], lay: ShardLayout) -> list[tuple[str, int]]:
        """Like `upload`, returning (sha256, size) per shard; keeps our pieces for our own merge."""
        out = []
        self.own = {}
        with _Uploads(self.transfer) as up:
            for s, (a, b) in enumerate(lay):
                blob = self.encoder(take(pg, a, b))
                sha = hashlib.sha256(blob).hexdigest()
                key = pg_key(self.prefix, rnd, self.stage, self.hotkey, s, sha)
                up.put(self.board.put_url(key, len(blob)), blob)  # while the next shard encodes
                self.own[s] = (sha, blob)
                out.append((sha, len(blob)))
        return out

    def _piece(self, rnd: int, p: Piece, s: int, n: int) -> tuple[torch.Tensor | None, str]:
        """A piece decoded, or None and why it is unusable: a property of the object (its sha256,
        its size, its bytes, a report without this shard), so every replica and validator leaves
        it out alike. A failed download (the store, the network) raises: abstain, never merge apart."""
        if s >= len(p.shas):
            return None, f"malformed report: no piece for shard {s} ({len(p.shas)} reported)"
        key = pg_key(self.prefix, rnd, self.stage, p.hotkey, s, p.shas[s])
        try:
            url = self.board.get_url(key)
        except (KeyError, ValueError):
            return None, f"malformed report: no URL for shard {s}"
        try:
            own = self.own.get(s) if p.hotkey == self.hotkey and s in self._alone else None
            if own is not None and own[0] == p.shas[s]:
                blob = own[1]  # what we uploaded and reported, and nobody else merges it
            else:
                blob = self.transfer.get_verified(url, p.shas[s], encoded_size(n, self.cfg.pg),
                                                  f"shard {s} of {p.hotkey}")
        except HashMismatch as exc:
            return None, f"hash mismatch: {exc}"[:300]
        except TransferError as exc:
            if exc.status != 413:
                raise
            return None, f"oversized: {exc}"[:300]
        try:
            return decode(blob, n, self.cfg.pg, device=self.device), ""
        except OuterError as exc:
            return None, f"undecodable: {exc}"[:300]

    def merge_one(self, rnd: int, s: int, rng: tuple[int, int], pieces: Sequence[Piece],
                  prev_ref: float | None, upload: bool | Callable[[str, bytes], None] = True) -> MergedShard:
        """Download, merge, encode and (unless a validator recomputes) upload shard `s`; returns
        the vote (the empty object's sha256 when nothing was usable: keep the shard). `upload`
        may be a function(url, blob) that puts it (in the background)."""
        n = rng[1] - rng[0]
        got = self._pieces(rnd, s, n, pieces)
        sm: ShardMerge = merge_shard([(p.samples, v) for p, (v, _) in zip(pieces, got)], n, prev_ref,
                                     self.cfg.params, self.cfg.merged)
        excluded = {pieces[i].hotkey: got[i][1] or why for i, why in sm.excluded}
        del got
        ref = fp32(sm.ref)
        # b"": keep the shard. Otherwise the clip reference rides in the voted bytes.
        blob = pack_update(sm.merged, ref, self.cfg.merged) if sm.merged is not None else b""
        sha = hashlib.sha256(blob).hexdigest()
        key = merged_key(self.prefix, rnd, self.stage, s, self.hotkey, sha)
        if blob and upload:
            put = upload if callable(upload) else self.transfer.put
            put(self.board.put_url(key, len(blob)), blob)
        return MergedShard(sha, key, sm.merged, ref, excluded, len(blob))

    def _pieces(self, rnd: int, s: int, n: int, pieces: Sequence[Piece]) -> list[tuple[torch.Tensor | None, str]]:
        """Every replica's decoded piece of shard `s`, downloaded in parallel, in `pieces`' order."""
        if self.fetchers <= 1 or len(pieces) <= 1:
            return [self._piece(rnd, p, s, n) for p in pieces]
        with ThreadPoolExecutor(min(self.fetchers, len(pieces)), thread_name_prefix="pieces") as pool:
            return list(pool.map(lambda p: self._piece(rnd, p, s, n), pieces))

    def merge(self, rnd: int, table: Sequence[Sequence[str]], lay: ShardLayout,
              pieces: Sequence[Piece], refs: Sequence[float | None]) -> dict[int, MergedShard]:
        """Merge every shard assigned to this replica (shard by shard; each upload runs while
        the next shard merges)."""
        self._alone = {s for s, hs in enumerate(table) if list(hs) == [self.hotkey]}
        try:
            with _Uploads(self.transfer) as up:
                return {s: self.merge_one(rnd, s, lay[s], pieces, refs[s], upload=up.put)
                        for s, hs in enumerate(table) if self.hotkey in hs}
        finally:
            self.own, self._alone = {}, set()

    def apply(self, rnd: int, theta: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor],
              lay: ShardLayout, decided: Sequence[tuple[Sequence[str], str] | None],
              mine: Mapping[int, MergedShard]) -> list[float | None]:
        """Apply the round's decided update in place: per shard (GET URLs of every agreeing
        merger's copy, sha256), or None to keep it. A shard this replica merged with the decided
        sha is applied from memory. Returns each shard's new clip reference (None: kept)."""
        refs: list[float | None] = []
        for s, (rng, d) in enumerate(zip(lay, decided)):
            if d is None:
                refs.append(None)
                continue
            urls, sha = d
            own = mine.get(s)
            if own is not None and own.sha == sha:
                ref, vec = own.ref, own.update
            else:
                ref, vec = read_update(self.transfer, urls, sha, rng[1] - rng[0], self.cfg.merged,
                                       f"merged shard {s}", self.device)
            apply_shard(theta, momentum, rng, vec, self.cfg.params)
            refs.append(ref)
        return refs


def read_update(transfer: ObjectTransfer, urls: Sequence[str], sha: str, n: int, codec: Codec,
                what: str, device: torch.device | str = "cpu") -> tuple[float, torch.Tensor]:
    """(clip reference, vector on `device`) of a decided merged update from the first agreeing
    merger's copy that is readable and checks out (sha256, exact size, decodes): one voter's bad
    copy never blocks a reader. TransferError when none does."""
    return first_good_copy(urls, lambda url: unpack_update(transfer.get_verified(url, sha, update_size(n, codec), what),
                                                            n, codec, device=device), what)


class _Uploads:
    """PUTs on one background thread, at most one waiting behind the one in flight (memory stays
    at two objects); leaving the block waits for them and raises the first failure."""

    def __init__(self, transfer: ObjectTransfer) -> None:
        self.transfer = transfer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sync-put")
        self._pending: list[Future] = []

    def put(self, url: str, blob: bytes) -> None:
        """Queue one PUT (waits while two are queued)."""
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self.transfer.put, url, blob))

    def __enter__(self) -> "_Uploads":
        return self

    def __exit__(self, *exc) -> None:
        try:
            for f in self._pending:
                f.result()
        finally:
            self._pool.shutdown(wait=True)

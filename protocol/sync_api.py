"""Wire messages of the sharded replica sync (issue 13); the routes are in protocol/routes.py
(`sync_*`), the typed calls `protocol.bridge_client.BridgeClient.sync_*`, the object keys
protocol/keys.py (`PieceKey`, `UpdateKey`).

Routes (all signed; miners and validators alike unless noted):
- `POST sync_upload`: a presigned PUT to the caller's own staging key for one shard object
  (`kind` pg: a pseudo-gradient shard, merged: a merged update the caller computed).
- `POST sync_pseudograd`: the caller's pseudo-gradient, one sha256 and size per shard; the bridge
  copies every shard to its write-once final key and enters the replica in the merge set.
- `GET sync_view`: everything about a stage's sharded round:
  the checkpoint it started from and the decided updates since, the frozen pieces with GET URLs,
  the merger table, the votes and each shard's decision.
- `POST sync_votes`: the caller's merged shards (sha256 and size each; the empty object's sha256
  votes "keep").
- `GET sync_disputes` / `POST sync_arbitrate`: validators only; disputed shards, and the sha256 a
  validator's recomputation of one reached.

Every size named in these messages must be the object's exact size (a piece: `resbm.sync_codec.
encoded_size(n, sync_codec)`, a merged update: 4 more bytes in `sync_merged_codec`, "keep": 0) and
every shard index in 0..sync_shards-1; the bridge refuses anything else before any store access
(docs/CONTRACTS.md, "Sharded replica sync").
"""
from __future__ import annotations

from typing import Optional

from typing import Annotated

from pydantic import Field, StringConstraints

from protocol.messages import StateRef, UploadGrant
from protocol.wire_types import round_field as _round, sha_field as _sha, url_field as _url
from protocol.run_config import MAX_BYTES as _MAX_BYTES
from protocol.run_config import StrictModel as _Model

__all__ = ["checkpoint_due",
           "SyncUpload", "UploadGrant", "SyncPseudograd", "UpdateRef", "RoundUpdate", "PieceRef",
           "SyncView", "ShardVote", "SyncVotes", "SyncVotesAck", "ShardDispute", "SyncDisputes",
           "ShardArbitration"]

_SHARDS = 4096
_Sha = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_Size = Annotated[int, Field(ge=0, le=_MAX_BYTES)]


def checkpoint_due(round_: int, checkpoint_every: int, total_rounds: int) -> bool:
    """Whether round `round_` ends with a full checkpoint: every K-th round, and the run's last."""
    return (round_ + 1) % checkpoint_every == 0 or round_ + 1 == total_rounds


class SyncUpload(_Model):
    """POST sync_upload: a PUT grant for one shard object of the merging round."""

    round: int = _round()
    kind: str = Field(pattern=r"^(pg|merged)$")
    shard: int = Field(ge=0, lt=_SHARDS)
    sha256: str = _sha()
    size: int = Field(ge=1, le=_MAX_BYTES)


class SyncPseudograd(_Model):
    """POST sync_pseudograd: every shard of the caller's pseudo-gradient was PUT to its grant."""

    round: int = _round()
    shas: list[_Sha] = Field(min_length=1, max_length=_SHARDS, description="lowercase hex sha256 per shard")
    sizes: list[_Size] = Field(min_length=1, max_length=_SHARDS)


class UpdateRef(_Model):
    """A decided merged update of one shard (every agreeing merger's copy holds the same bytes)."""

    sha256: str = _sha()
    size: int = Field(ge=0, le=_MAX_BYTES)
    key: str = Field(min_length=1, max_length=512, description="final key of `url`")
    url: str = _url()
    alt_urls: list[str] = Field(default_factory=list, max_length=64)


class RoundUpdate(_Model):
    """One round's decided update of a stage: per shard an UpdateRef, or None (kept)."""

    round: int = _round()
    shards: list[Optional[UpdateRef]] = Field(max_length=_SHARDS)


class PieceRef(_Model):
    """One replica's pseudo-gradient in the frozen set: verified samples, sha256 and URL per shard."""

    hotkey: str = Field(min_length=1, max_length=128)
    samples: int = Field(ge=0)
    epoch: int = Field(default=0, ge=0)
    shas: list[str] = Field(max_length=_SHARDS)
    urls: list[str] = Field(max_length=_SHARDS)


class SyncView(_Model):
    """GET sync_view: a stage's sharded round (`frozen` false: only the start is known yet)."""

    round: int = _round()
    stage: int = Field(ge=0, le=63)
    shards: int = Field(ge=1, le=_SHARDS)
    checkpoint: Optional[StateRef] = None
    checkpoint_round: int = Field(default=0, ge=0, description="round the checkpoint starts (0: init)")
    updates: list[RoundUpdate] = Field(default_factory=list, max_length=100_000,
                                       description="decided updates of rounds checkpoint_round..round-1")
    frozen: bool = False
    pieces: list[PieceRef] = Field(default_factory=list, max_length=1024)
    mergers: list[list[str]] = Field(default_factory=list, max_length=_SHARDS)
    votes: list[dict[str, str]] = Field(default_factory=list, max_length=_SHARDS)
    complete: bool = False
    decided: list[Optional[UpdateRef]] = Field(default_factory=list, max_length=_SHARDS)
    disputes: list[int] = Field(default_factory=list, max_length=_SHARDS)
    published: bool = False


class ShardVote(_Model):
    """A merger's merged update of one shard: its sha256 (the empty object's: keep) and size."""

    shard: int = Field(ge=0, lt=_SHARDS)
    sha256: str = _sha()
    size: int = Field(ge=0, le=_MAX_BYTES)


class SyncVotes(_Model):
    """POST sync_votes: the caller's votes on the shards it merges."""

    round: int = _round()
    votes: list[ShardVote] = Field(min_length=1, max_length=_SHARDS)


class SyncVotesAck(_Model):
    """Per voted shard: whether it agrees with the decision (None: undecided yet)."""

    agreed: dict[int, Optional[bool]] = Field(default_factory=dict)


class ShardDispute(_Model):
    """A disputed shard of the merging round."""

    round: int = _round()
    stage: int = Field(ge=0, le=63)
    shard: int = Field(ge=0, lt=_SHARDS)
    deadline: float = Field(ge=0)


class SyncDisputes(_Model):
    """GET sync_disputes."""

    disputes: list[ShardDispute] = Field(default_factory=list, max_length=_SHARDS * 64)


class ShardArbitration(_Model):
    """POST sync_arbitrate: the sha256 a validator's recomputation of a disputed shard reached."""

    round: int = _round()
    stage: int = Field(ge=0, le=63)
    shard: int = Field(ge=0, lt=_SHARDS)
    sha256: str = _sha()


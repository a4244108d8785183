"""Wire messages of the round's merge: uploads, pseudo-gradient reports, the frozen merge set,
the shard plan and merged-state votes."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from protocol.run_config import MAX_BYTES
from protocol.run_config import StrictModel as _Model
from protocol.wire_types import (MAX_INT, StateRef, hotkey_field, key_field, round_field, sha_field,
                                 url_field)

__all__ = [
    "StageRound",
    "UploadRequest",
    "UploadGrant",
    "PseudogradReport",
    "MergeItem",
    "MergeSet",
    "ShardPlan",
    "MergedReport",
    "MergedAck",
]

class StageRound(_Model):
    """Path parameters of the per-stage round routes (`/v1/rounds/{round}/stages/{stage}/...`)."""

    round: int = round_field()
    stage: int = Field(ge=0, le=63)


class UploadRequest(_Model):
    """POST /v1/rounds/upload: ask for a presigned PUT for a pseudo-gradient or a merged state."""

    round: int = round_field()
    kind: Literal["pseudograd", "state"]
    sha256: str = sha_field()
    size: int = Field(ge=1, le=MAX_BYTES)


class UploadGrant(_Model):
    """A presigned PUT for exactly `size` bytes at `key` (content-addressed)."""

    put_url: str = url_field()
    key: str = key_field()
    expires_at: float = Field(ge=0)


class PseudogradReport(_Model):
    """POST /v1/rounds/pseudograd: pseudo-gradient uploaded at the staging `key` of its grant.
    Its merge weight is the bridge's count of the replica's verified backwards, not a claim."""

    round: int = round_field()
    key: str = key_field()
    sha256: str = sha_field()
    size: int = Field(ge=1, le=MAX_BYTES)


class MergeItem(_Model):
    """One replica's pseudo-gradient in a frozen merge set."""

    hotkey: str = hotkey_field()
    stage: int = Field(default=0, ge=0, le=63)
    key: str = key_field()
    sha256: str = sha_field()
    size: int = Field(ge=1, le=MAX_BYTES)
    samples: int = Field(ge=0, le=1_000_000, description="backwards the bridge verified")
    epoch: int = Field(default=0, ge=0, le=MAX_INT, description="registration epoch that reported it")
    get_url: str = url_field()


class MergeSet(_Model):
    """GET /v1/rounds/{r}/stages/{s}/pseudograds once frozen; items in fixed (hotkey) order."""

    round: int = round_field()
    stage: int = Field(ge=0, le=63)
    items: list[MergeItem] = Field(max_length=1024)


class ShardPlan(_Model):
    """GET /v1/rounds/{r}/stages/{s}/shards once frozen: who merges each shard this round
    (resbm.shards.assign_mergers over the frozen set; a small stage uses the first rows only)."""

    round: int = round_field()
    stage: int = Field(ge=0, le=63)
    shards: int = Field(ge=1, le=4096)
    mergers: list[list[str]] = Field(max_length=4096)


class MergedReport(_Model):
    """POST /v1/rounds/merged: sha256 of the state (theta, momentum) this replica computed."""

    round: int = round_field()
    sha256: str = sha_field()
    key: str = key_field()


class MergedAck(_Model):
    """Answer to merged: whether the stage's round r+1 state is published, and which it is."""

    published: bool
    agreed: Optional[bool] = Field(default=None, description="None until published")
    state: Optional[StateRef] = None

"""Wire messages of the round's full-state (checkpoint) votes, and a merge set's entries; the
pieces, shard votes and views of the sync are in protocol/sync_api.py."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, StringConstraints

from protocol.run_config import MAX_BYTES
from protocol.run_config import StrictModel as _Model
from protocol.wire_types import (MAX_INT, SHA_PATTERN, StateRef, hotkey_field, key_field, round_field,
                                 sha_field, url_field)

__all__ = [
    "StageRound",
    "UploadRequest",
    "UploadGrant",
    "MergeItem",
    "MergedReport",
    "MergedAck",
]

class StageRound(_Model):
    """Path parameters of the per-stage round routes (`/v1/rounds/{round}/stages/{stage}/...`)."""

    round: int = round_field()
    stage: int = Field(ge=0, le=63)


class UploadRequest(_Model):
    """POST /v1/rounds/upload: ask for a presigned PUT for the full state a replica votes in a
    checkpoint round (pseudo-gradients go up in pieces: protocol/sync_api.py)."""

    round: int = round_field()
    kind: Literal["state"] = "state"
    sha256: str = sha_field()
    size: int = Field(ge=1, le=MAX_BYTES)


class UploadGrant(_Model):
    """A presigned PUT for exactly `size` bytes at `key` (content-addressed)."""

    put_url: str = url_field()
    key: str = key_field()
    expires_at: float = Field(ge=0)


class MergeItem(_Model):
    """One replica's pseudo-gradient in a frozen merge set: its pieces' sha256s (one per shard; the
    objects' URLs come with the round's sync view), their total size, and its merge weight."""

    hotkey: str = hotkey_field()
    stage: int = Field(default=0, ge=0, le=63)
    sha256: str = Field(pattern=SHA_PATTERN, description="sha256 of the piece sha256s, one a line")
    size: int = Field(ge=1, le=MAX_BYTES, description="the pieces' bytes in all")
    samples: int = Field(ge=0, le=1_000_000, description="backwards the bridge verified")
    epoch: int = Field(default=0, ge=0, le=MAX_INT, description="registration epoch that reported it")
    shas: list[Annotated[str, StringConstraints(pattern=SHA_PATTERN)]] = Field(min_length=1, max_length=4096)


class MergedReport(_Model):
    """POST /v1/rounds/merged: sha256 of the full state (a checkpoint) this replica computed."""

    round: int = round_field()
    sha256: str = sha_field()
    key: str = key_field()


class MergedAck(_Model):
    """Answer to merged: whether the stage's round r+1 state is published, and which it is."""

    published: bool
    agreed: Optional[bool] = Field(default=None, description="None until published")
    state: Optional[StateRef] = None

"""Wire messages between validators and the bridge about merge integrity: disputes the bridge
asks validators to settle, their recomputed hashes, and audit verdicts (which quarantine)."""
from __future__ import annotations

from pydantic import Field

from protocol.round_messages import MergeItem
from protocol.wire_types import StateRef, hotkey_field, round_field, sha_field
from protocol.run_config import StrictModel as _Model

__all__ = ["DisputeVote", "Dispute", "DisputeList", "Arbitration", "ArbitrationAck",
           "Verdict", "VerdictReport", "VerdictAck"]


class DisputeVote(_Model):
    """One replica's vote in a disputed stage."""

    hotkey: str = hotkey_field()
    sha256: str = sha_field()


class Dispute(_Model):
    """A stage whose votes split: recompute its merge from `start` and `items`."""

    round: int = round_field()
    stage: int = Field(ge=0, le=63)
    deadline: float = Field(ge=0, description="unix time after which the previous state is kept")
    start: StateRef | None = Field(description="state the round started from (None: init_seed)")
    items: list[MergeItem] = Field(max_length=1024, description="the frozen merge set")
    votes: list[DisputeVote] = Field(max_length=1024)


class DisputeList(_Model):
    """GET /v1/validator/disputes."""

    disputes: list[Dispute] = Field(max_length=64)


class Arbitration(_Model):
    """POST /v1/validator/arbitrate: the sha256 of the state this validator recomputed."""

    round: int = round_field()
    stage: int = Field(ge=0, le=63)
    sha256: str = sha_field()


class ArbitrationAck(_Model):
    """Whether a voter agreed with the recomputation (False: the previous state is kept)."""

    agreed: bool


class Verdict(_Model):
    """One audit or merge-check outcome for a miner in a round."""

    hotkey: str = hotkey_field()
    passed: bool
    reason: str = Field(default="", max_length=500)


class VerdictReport(_Model):
    """POST /v1/validator/verdicts: a validator's verdicts of one round."""

    round: int = round_field()
    verdicts: list[Verdict] = Field(max_length=4096)


class VerdictAck(_Model):
    """Miners quarantined by this report, with the round their quarantine lasts until."""

    quarantined: dict[str, int] = Field(default_factory=dict)

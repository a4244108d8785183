"""What a validator publishes to the bridge for the owner's dashboard: audit verdicts, scores, weights.

The bridge stores the latest report of each validator (signed, validator permit required) and
shows it on its read-only dashboard; nothing here feeds back into routing or scoring.
"""
from __future__ import annotations

import math
from typing import Annotated, Optional

from pydantic import Field, field_validator

from protocol.run_config import StrictModel

__all__ = ["AuditVerdict", "ValidatorReport", "ValidationLossReport", "MAX_VERDICTS", "MAX_LOSS",
           "validation_tokens"]

MAX_VERDICTS = 1024
MAX_LOSS = 1000.0  # nats per token: far above ln(vocab) of any vocabulary a run can have


def validation_tokens(val_tokens: int, seq_len: int) -> int:
    """Target tokens of a run's validation windows: ceil(val_tokens / seq_len) whole windows."""
    return -(-val_tokens // seq_len) * seq_len


class AuditVerdict(StrictModel):
    """One audit of one miner's round."""

    round: int = Field(ge=0, le=2**62)
    hotkey: str = Field(min_length=1, max_length=64)
    passed: bool
    reason: str = Field(default="", max_length=512)


class ValidatorReport(StrictModel):
    """POST /v1/validator/report: the validator's view after a round or a weight set."""

    round: int = Field(ge=-1, le=2**62, description="last round processed (-1: none yet)")
    window: int = Field(ge=0, le=2**62, description="score windows closed so far")
    verdicts: list[AuditVerdict] = Field(default_factory=list, max_length=MAX_VERDICTS,
                                         description="audits since the previous report")
    scores: dict[str, float] = Field(default_factory=dict, max_length=100_000,
                                     description="hotkey -> smoothed score")
    weights: Optional[dict[str, float]] = Field(
        default=None, max_length=100_000, description="hotkey -> weight of the last set (None: unchanged)")
    uncalibrated: list[Annotated[str, Field(max_length=512)]] = Field(
        default_factory=list, max_length=64,
        description="combinations (model, miner numerics and GPU, replay) this validator audits without a "
        "calibrated tolerance: no penalty rests on them")

    @field_validator("scores", "weights")
    @classmethod
    def _finite(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for k, x in (v or {}).items():
            if not 0 < len(k) <= 64:
                raise ValueError(f"bad hotkey {k!r}")
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"value for {k} must be finite and >= 0, got {x!r}")
        return v


class ValidationLossReport(StrictModel):
    """POST /v1/validator/validation: a validator's held-out loss of the model a round published,
    on the run's `val_tokens` validation tokens (the bridge shows the median of validators' reports)."""

    round: int = Field(ge=0, le=2**62, description="the model after this round's merge")
    loss: float = Field(gt=0, le=MAX_LOSS, description="mean cross-entropy, nats per token")
    tokens: int = Field(ge=1, le=2**40, description="validation tokens evaluated: validation_tokens(run)")

    @field_validator("loss")
    @classmethod
    def _finite_loss(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"loss must be finite, got {v!r}")
        return v

"""`IncentiveParams`: every scoring knob validators must agree on, set by the owner in the run config.

The bridge serves them inside the run config at /v1/run; every validator scores with them
(`neurons.scoring`), so two honest validators compute the same weights. Defaults are the values
the incentive simulator (`scripts/simulate_incentives.py`) was run with in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import math
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.lifecycle import HopKind

__all__ = ["HOP_KINDS", "IncentiveParams", "DEFAULT_INCENTIVES"]

HOP_KINDS = (*(k.value for k in HopKind), "bwd_recompute")  # credit kinds: a recompute costs more


class IncentiveParams(BaseModel):
    """Hop weights, smoothing, penalties, audit rates and burn share (validated; immutable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hop_weights: dict[str, float] = Field(
        default_factory=lambda: {"fwd": 1.0, "bwd": 2.0, "fwdbwd": 3.0, "bwd_recompute": 3.0},
        description="throughput credit per completed hop of each kind (its relative compute)")
    stage_weights: Optional[list[float]] = Field(
        default=None, max_length=64,
        description="per-stage multiplier of hop credit (one per stage; None: all 1.0)")
    ema_alpha: float = Field(default=0.3, gt=0, le=1, description="weight of the newest window in the score EMA")
    penalty_windows: int = Field(default=3, ge=0, le=1000,
                                 description="windows that earn nothing after a failed audit")
    penalty_growth: float = Field(default=1.0, ge=1, le=100,
                                  description="penalty multiplier per earlier failure (1: flat; 2: doubles)")
    audit_fraction: float = Field(default=0.5, gt=0, le=1,
                                  description="base probability of auditing a miner after a round")
    new_boost: float = Field(default=3.0, ge=1, le=1000, description="audit-rate multiplier for new miners")
    failed_boost: float = Field(default=4.0, ge=1, le=1000,
                                description="audit-rate multiplier for miners that ever failed an audit")
    new_threshold: int = Field(default=3, ge=0, le=1000,
                               description="passed audits before a miner stops counting as new")
    burn_share: float = Field(default=0.1, ge=0, le=1, description="share of weight set on the owner's uid")

    @field_validator("hop_weights")
    @classmethod
    def _hop_weights(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != set(HOP_KINDS):
            missing, extra = sorted(set(HOP_KINDS) - set(v)), sorted(set(v) - set(HOP_KINDS))
            raise ValueError(f"hop_weights needs exactly the kinds {list(HOP_KINDS)}"
                             f"{'; missing ' + str(missing) if missing else ''}"
                             f"{'; unknown ' + str(extra) if extra else ''}")
        for kind, w in v.items():
            if not math.isfinite(w) or w <= 0 or w > 1e6:
                raise ValueError(f"hop_weights.{kind} must be in (0, 1e6], got {w!r}")
        return {k: float(v[k]) for k in HOP_KINDS}

    @field_validator("stage_weights")
    @classmethod
    def _stage_weights(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is None:
            return v
        if not v:
            raise ValueError("stage_weights must list one weight per stage (or be omitted)")
        for i, w in enumerate(v):
            if not math.isfinite(w) or w <= 0 or w > 1e6:
                raise ValueError(f"stage_weights[{i}] must be in (0, 1e6], got {w!r}")
        return v

    def hop_weight(self, kind: str, stage: Optional[int] = None) -> float:
        """Credit of one hop of `kind` at `stage` (None: no stage multiplier)."""
        w = self.hop_weights[kind]
        if stage is not None and self.stage_weights is not None:
            if not 0 <= stage < len(self.stage_weights):
                raise ValueError(f"stage {stage} has no entry in stage_weights "
                                 f"({len(self.stage_weights)} stages configured)")
            w *= self.stage_weights[stage]
        return w


DEFAULT_INCENTIVES = IncentiveParams()

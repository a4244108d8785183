"""`AuditTolerance`: one calibrated pass threshold of the replay audit, carried in the run config,
keyed by everything it was calibrated on.

`scripts/calibrate_audit.py` measures the honest spread (a miner of one numerics class against the
validator's replay in another) per stage, hop kind and inner-step range, and every cheater kind's
error, and writes these entries with what they were measured on: the model config's hash, the
miner's and the replay's device class, dtype and GPU model, and the inner steps covered.
neurons/audit_tolerances.py picks the entry that applies to a hop; a hop no entry covers is
uncalibrated, and no penalty rests on it (docs/VALIDATING.md, "Calibrated or not trusted").
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.lifecycle import HopKind

__all__ = ["AUDIT_KINDS", "NUMERICS_PATTERN", "MODEL_HASH_PATTERN", "AuditTolerance"]

AUDIT_KINDS = (*(k.value for k in HopKind), "pseudograd")  # every hop kind, and the merge input
NUMERICS_PATTERN = r"^(\*|(cpu|cuda|mps)/(float32|bfloat16|float16))$"
"""'device_class/compute_dtype', e.g. 'cuda/bfloat16', or '*' for any."""
MODEL_HASH_PATTERN = r"^(\*|[0-9a-f]{16})$"
"""`resbm.config.ModelConfig.config_hash()` of the calibrated model, or '*' for any model."""


class AuditTolerance(BaseModel):
    """Pass thresholds for hops of `kind` at `stage` (None: any) and inner steps `step_from` ..
    `step_to` (the pseudo-gradient: the round's last inner step), of a `model` by a miner of
    `miner` numerics on `miner_gpu`, replayed in `replay` numerics on `replay_gpu`. `model` has no
    default: an entry says which model it was calibrated on ('*' only by deliberate choice).
    Strict like every run-config model (run_config.StrictModel)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=MODEL_HASH_PATTERN,
                       description="ModelConfig.config_hash() of the calibrated model, or '*' (any model)")
    miner: str = Field(pattern=NUMERICS_PATTERN, description="the miner's declared 'device/dtype' or '*'")
    replay: str = Field(pattern=NUMERICS_PATTERN, description="the validator's replay 'device/dtype' or '*'")
    miner_gpu: str = Field(default="*", max_length=64,
                           description="the miner's declared GPU model ('' for none), or '*' for any")
    replay_gpu: str = Field(default="*", max_length=64,
                            description="the validator's GPU model ('' for none), or '*' for any")
    stage: Optional[int] = Field(default=None, ge=0, le=63, description="None = every stage")
    kind: Literal[AUDIT_KINDS]  # type: ignore[valid-type]
    step_from: int = Field(default=0, ge=0, le=100_000, description="first inner step covered")
    step_to: Optional[int] = Field(default=None, ge=0, le=100_000,
                                   description="last inner step covered (None: every later one)")
    rel_err: float = Field(gt=0, le=10, description="largest ||claimed - replay|| / ||replay||")
    min_cosine: float = Field(ge=-1, le=1, description="smallest cosine(claimed, replay)")
    norm_ratio: float = Field(gt=0, le=10, description="largest |norm(claimed) / norm(replay) - 1|")
    loss_abs: float = Field(default=0.02, ge=0, le=100, description="fwdbwd: loss tolerance, absolute part")
    loss_rel: float = Field(default=1e-2, ge=0, le=10, description="fwdbwd: loss tolerance, relative part")
    measured_max_rel_err: Optional[float] = Field(
        default=None, ge=0, description="information: the largest honest rel err the calibration saw")
    measured_hops: Optional[int] = Field(
        default=None, ge=0, description="information: honest replays behind this entry")

    @model_validator(mode="after")
    def _steps_in_order(self) -> "AuditTolerance":
        if self.step_to is not None and self.step_to < self.step_from:
            raise ValueError(f"step_to={self.step_to} < step_from={self.step_from}")
        return self

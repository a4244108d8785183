"""`AuditTolerance`: one calibrated pass threshold of the replay audit, carried in the run config.

`scripts/calibrate_audit.py` measures the honest spread (a miner of one numerics class against the
validator's replay in another) per stage and hop kind, and every cheater kind's error, and writes
these entries; neurons/audit_tolerances.py picks the one that applies to a hop.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from protocol.lifecycle import HopKind

__all__ = ["AUDIT_KINDS", "NUMERICS_PATTERN", "AuditTolerance"]

AUDIT_KINDS = (*(k.value for k in HopKind), "pseudograd")  # every hop kind, and the merge input
NUMERICS_PATTERN = r"^(\*|(cpu|cuda|mps)/(float32|bfloat16|float16))$"
"""'device_class/compute_dtype', e.g. 'cuda/bfloat16', or '*' for any."""


class AuditTolerance(BaseModel):
    """Pass thresholds for hops of `kind` at `stage` (None: any) by a miner of `miner` numerics
    replayed in `replay` numerics. Strict like every run-config model (run_config.StrictModel)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    miner: str = Field(pattern=NUMERICS_PATTERN, description="the miner's declared 'device/dtype' or '*'")
    replay: str = Field(pattern=NUMERICS_PATTERN, description="the validator's replay 'device/dtype' or '*'")
    stage: Optional[int] = Field(default=None, ge=0, le=63, description="None = every stage")
    kind: Literal[AUDIT_KINDS]  # type: ignore[valid-type]
    rel_err: float = Field(gt=0, le=10, description="largest ||claimed - replay|| / ||replay||")
    min_cosine: float = Field(ge=-1, le=1, description="smallest cosine(claimed, replay)")
    norm_ratio: float = Field(gt=0, le=10, description="largest |norm(claimed) / norm(replay) - 1|")
    loss_abs: float = Field(default=0.02, ge=0, le=100, description="fwdbwd: loss tolerance, absolute part")
    loss_rel: float = Field(default=1e-2, ge=0, le=10, description="fwdbwd: loss tolerance, relative part")
    measured_max_rel_err: Optional[float] = Field(
        default=None, ge=0, description="information: the largest honest rel err the calibration saw")

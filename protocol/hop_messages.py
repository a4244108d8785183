"""Wire messages of the hop phase: joining and leaving, leases, hop outcomes and inner steps."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

from protocol.run_config import MAX_BYTES, RunConfig
from protocol.run_config import StrictModel as _Model
from protocol.wire_types import (MAX_INT, PROTOCOL_VERSION, SHA_PATTERN, ComputeDtype,
                                 DeviceClass, FailReason, device_name_field, HopKind, LeaseAction, ObjectRef,
                                 OutputRef, Phase, StateRef, hop_id_field, hotkey_field,
                                 round_field)

__all__ = [
    "RegisterRequest",
    "LeaveRequest",
    "LeaveResponse",
    "Assignment",
    "LeaseRequest",
    "Hop",
    "LeaseResponse",
    "HopDone",
    "HopFail",
    "StepDone",
    "StepAck",
]

class RegisterRequest(_Model):
    """POST /v1/miners/register; the miner declares its numerics so audits replay like for like."""

    protocol_version: str = Field(default=PROTOCOL_VERSION, max_length=32)
    device_class: DeviceClass = "cpu"
    compute_dtype: ComputeDtype = "float32"
    device_name: str = device_name_field()


class LeaveRequest(_Model):
    """POST /v1/miners/leave: the miner is stopping; its leases go elsewhere at once."""

    reason: str = Field(default="shutdown", max_length=200)


class LeaveResponse(_Model):
    """Answer to leave: how many leased or queued hops moved to other miners."""

    hops_moved: int = Field(ge=0)


class Assignment(_Model):
    """Answer to register: the stage to serve and where the round's weights come from.

    `state` is None for round 0 (build from `run.init_seed`) or when the stage has no published
    state yet; otherwise download it and check its sha256."""

    hotkey: str = hotkey_field()
    stage: int = Field(ge=0, le=63)
    round: int = round_field()
    inner_step: int = Field(ge=0, le=MAX_INT)
    phase: Phase
    state: Optional[StateRef] = None
    run: RunConfig


class LeaseRequest(_Model):
    """POST /v1/hops/lease; sizes are the exact encoded sizes of this stage's outputs."""

    max_hops: int = Field(default=1, ge=1, le=64)
    fwd_out_bytes: int = Field(ge=0, le=MAX_BYTES, description="encoded activation size (0 at last stage)")
    bwd_out_bytes: int = Field(ge=0, le=MAX_BYTES, description="encoded input-gradient size (0 at stage 0)")
    wait_ms: int = Field(default=0, ge=0, le=30_000,
                         description="long-poll: hold the request up to this long while there "
                         "is nothing to do, instead of answering `wait` at once")
    max_open_graphs: int = Field(default=0, ge=0, le=4096,
                                 description="bound on the forward graphs this replica holds (its memory): "
                                 "no pooled forward while open graphs + forwards held reach it (0: no bound)")


class Hop(_Model):
    """One unit of work. `act_in` is the forward input (None at stage 0: tokens from sample_id);
    `grad_in` the incoming gradient of a bwd. A recompute bwd gets both. `output` is None for a
    stage-0 bwd. `fwd_hop_id` names the forward whose graph a (non-recompute) bwd continues."""

    hop_id: str = hop_id_field()
    sample_id: int = Field(ge=0, le=MAX_INT)
    round: int = round_field()
    stage: int = Field(ge=0, le=63)
    kind: HopKind
    recompute: bool = False
    inner_step: int = Field(ge=0, le=MAX_INT)
    attempt: int = Field(ge=1, le=100)
    fwd_hop_id: Optional[str] = Field(default=None, max_length=64)
    act_in: Optional[ObjectRef] = None
    grad_in: Optional[ObjectRef] = None
    output: Optional[OutputRef] = None
    deadline: float = Field(ge=0)


class LeaseResponse(_Model):
    """Answer to lease: an action and, for `work`, the hops."""

    action: LeaseAction
    hops: list[Hop] = Field(default_factory=list, max_length=64)
    round: int = round_field()
    inner_step: int = Field(ge=0, le=MAX_INT)
    stage: int = Field(ge=0, le=63)
    state_sha: Optional[str] = Field(default=None, pattern=SHA_PATTERN)
    step_samples: int = Field(default=0, ge=0, le=1_000_000,
                              description="backwards the bridge counted since the last step")
    retry_after: float = Field(default=0.0, ge=0, le=3600)
    parked_ms: int = Field(default=0, ge=0, le=3_600_000,
                           description="how long the bridge held this request (long-poll) before answering")


class HopDone(_Model):
    """POST /v1/hops/done: the output was uploaded; the bridge seals it (server-side copy to
    the hop's output key, which no URL can write) and records the reported sha256."""

    hop_id: str = hop_id_field()
    sha256: Optional[str] = Field(default=None, pattern=SHA_PATTERN, description="None only for stage-0 bwd")
    size: int = Field(default=0, ge=0, le=MAX_BYTES)
    loss: Optional[float] = Field(default=None, description="last stage only; finite")
    compute_seconds: float = Field(default=0.0, ge=0, le=86_400)

    @field_validator("loss")
    @classmethod
    def _finite(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not (-1e30 < v < 1e30):
            raise ValueError("loss must be finite")
        return v


class HopFail(_Model):
    """POST /v1/hops/fail: the hop's input object was bad. The bridge checks the sealed input
    and charges whoever it proves wrong: the producer (its hop is redone elsewhere) or the
    reporting consumer (its hop is retried elsewhere); `Ack.message` names the outcome."""

    hop_id: str = hop_id_field()
    reason: FailReason
    detail: str = Field(default="", max_length=1000)


class StepDone(_Model):
    """POST /v1/steps/done: the miner took inner step `inner_step` over `samples` samples."""

    round: int = round_field()
    inner_step: int = Field(ge=0, le=MAX_INT)
    samples: int = Field(ge=0, le=1_000_000)


class StepAck(_Model):
    """Answer to steps/done: the miner's next inner step."""

    round: int = round_field()
    inner_step: int = Field(ge=0, le=MAX_INT)

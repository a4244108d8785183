"""Wire messages of the bridge API (pydantic v2): every request and response body, and RunConfig.

Every model forbids unknown fields and bounds every string, list and number, so a malformed
body fails validation with an error that names the field. Times are unix seconds (float).

Conventions the miner relies on:
- `LeaseResponse.action`: `work` (hops attached), `wait` (retry after `retry_after`), `step`
  (take an optimizer step, then `POST /v1/steps/done`), `merge` (round over: upload the
  pseudo-gradient, merge, report), `reassign` (call `POST /v1/miners/register` again; also
  what to do whenever `LeaseResponse.state_sha` differs from the state you hold), `done`.
- `GET /v1/rounds/{r}/stages/{s}/pseudograds` answers 409 with `ErrorBody(error="not_frozen",
  retry_after=...)` until the merge set is frozen, then 200 with a `MergeSet`.
- Errors are `ErrorBody` JSON with the HTTP status (400 bad input, 401/403 auth, 404 unknown,
  409 conflict / wrong state, 413 body too large, 429 rate limited).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from protocol.run_config import MAX_BYTES as _MAX_BYTES
from protocol.run_config import RunConfig, StrictModel as _Model

__all__ = [
    "PROTOCOL_VERSION",
    "Vote",
    "ShardPlan",
    "HopKind",
    "DeviceClass",
    "ComputeDtype",
    "LeaseAction",
    "FailReason",
    "Phase",
    "RunConfig",
    "Health",
    "RunInfo",
    "LeaveRequest",
    "LeaveResponse",
    "ErrorBody",
    "ObjectRef",
    "OutputRef",
    "StateRef",
    "RegisterRequest",
    "Assignment",
    "LeaseRequest",
    "Hop",
    "LeaseResponse",
    "HopDone",
    "HopFail",
    "Ack",
    "StepDone",
    "StepAck",
    "UploadRequest",
    "UploadGrant",
    "PseudogradReport",
    "MergeItem",
    "MergeSet",
    "MergedReport",
    "MergedAck",
    "StageMetrics",
    "MinerMetrics",
    "Metrics",
    "HopRecord",
    "HopLog",
    "HopLogQuery",
    "StageRound",
    "DatasetFile",
]

PROTOCOL_VERSION = "resbm/2"

HopKind = Literal["fwd", "bwd", "fwdbwd"]
LeaseAction = Literal["work", "wait", "step", "merge", "reassign", "done"]
FailReason = Literal["bad_hash", "bad_shape", "nonfinite", "missing", "other"]
Phase = Literal["waiting", "train", "merge", "done"]

_SHA = r"^[0-9a-f]{64}$"
_MAX_INT = 2**62


def _sha() -> Any:
    return Field(pattern=_SHA, min_length=64, max_length=64, description="lowercase hex sha256")


def _key() -> Any:
    return Field(min_length=1, max_length=512, description="object key in the run's bucket")


def _url() -> Any:
    return Field(min_length=1, max_length=4096, description="presigned URL")


def _hotkey() -> Any:
    return Field(min_length=1, max_length=64, description="ss58 hotkey")


def _hop_id() -> Any:
    return Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="hop id")


def _round() -> Any:
    return Field(ge=0, le=_MAX_INT, description="round index")


class Health(_Model):
    """GET /health (unsigned)."""

    status: Literal["ok"] = "ok"
    hotkey: str = _hotkey()
    protocol_version: str = Field(default=PROTOCOL_VERSION, max_length=32)
    netuid: Optional[int] = None  # the subnet the bridge serves (neurons check theirs against it)


class RunInfo(_Model):
    """GET /v1/run."""

    run: RunConfig
    bridge_hotkey: str = _hotkey()
    protocol_version: str = Field(default=PROTOCOL_VERSION, max_length=32)


class ErrorBody(_Model):
    """Body of every non-2xx answer."""

    error: str = Field(max_length=64, description="short machine-readable code")
    message: str = Field(max_length=2000, description="what was wrong, naming the field")
    retry_after: Optional[float] = Field(default=None, ge=0, le=86_400)


class ObjectRef(_Model):
    """An object to download: key, presigned GET URL and the sha256 it must have."""

    key: str = _key()
    url: str = _url()
    sha256: str = _sha()
    size: int = Field(ge=0, le=_MAX_BYTES)


class OutputRef(_Model):
    """Where to upload a hop's output: presigned PUT signed for exactly `size` bytes."""

    key: str = _key()
    put_url: str = _url()
    size: int = Field(ge=1, le=_MAX_BYTES)
    expires_at: float = Field(ge=0)


class StateRef(_Model):
    """A stage's published state (theta + outer momentum, safetensors) for a round."""

    round: int = _round()
    stage: int = Field(ge=0, le=63)
    key: str = _key()
    url: str = _url()
    sha256: str = _sha()
    size: int = Field(ge=0, le=_MAX_BYTES)
    alt_urls: list[str] = Field(default_factory=list, max_length=1024,
                                description="other voters' copies of the same bytes, if `url` fails")


DeviceClass = Literal["cpu", "cuda", "mps"]
"""Where a miner computes; validators replay in the same class when they can (docs/AUDIT.md)."""
ComputeDtype = Literal["float32", "bfloat16", "float16"]
"""A miner's compute dtype (float32, or bf16 / fp16 autocast with fp32 weights)."""


class RegisterRequest(_Model):
    """POST /v1/miners/register; the miner declares its numerics so audits replay like for like."""

    protocol_version: str = Field(default=PROTOCOL_VERSION, max_length=32)
    device_class: DeviceClass = "cpu"
    compute_dtype: ComputeDtype = "float32"


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

    hotkey: str = _hotkey()
    stage: int = Field(ge=0, le=63)
    round: int = _round()
    inner_step: int = Field(ge=0, le=_MAX_INT)
    phase: Phase
    state: Optional[StateRef] = None
    run: RunConfig


class LeaseRequest(_Model):
    """POST /v1/hops/lease; sizes are the exact encoded sizes of this stage's outputs."""

    max_hops: int = Field(default=1, ge=1, le=64)
    fwd_out_bytes: int = Field(ge=0, le=_MAX_BYTES, description="encoded activation size (0 at last stage)")
    bwd_out_bytes: int = Field(ge=0, le=_MAX_BYTES, description="encoded input-gradient size (0 at stage 0)")
    wait_ms: int = Field(default=0, ge=0, le=30_000,
                         description="long-poll: hold the request up to this long while there "
                         "is nothing to do, instead of answering `wait` at once")


class Hop(_Model):
    """One unit of work. `act_in` is the forward input (None at stage 0: tokens from sample_id);
    `grad_in` the incoming gradient of a bwd. A recompute bwd gets both. `output` is None for a
    stage-0 bwd. `fwd_hop_id` names the forward whose graph a (non-recompute) bwd continues."""

    hop_id: str = _hop_id()
    sample_id: int = Field(ge=0, le=_MAX_INT)
    round: int = _round()
    stage: int = Field(ge=0, le=63)
    kind: HopKind
    recompute: bool = False
    inner_step: int = Field(ge=0, le=_MAX_INT)
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
    round: int = _round()
    inner_step: int = Field(ge=0, le=_MAX_INT)
    stage: int = Field(ge=0, le=63)
    state_sha: Optional[str] = Field(default=None, pattern=_SHA)
    step_samples: int = Field(default=0, ge=0, le=1_000_000,
                              description="backwards the bridge counted since the last step")
    retry_after: float = Field(default=0.0, ge=0, le=3600)


class HopDone(_Model):
    """POST /v1/hops/done: the output was uploaded; the bridge seals it (server-side copy to
    the hop's output key, which no URL can write) and records the reported sha256."""

    hop_id: str = _hop_id()
    sha256: Optional[str] = Field(default=None, pattern=_SHA, description="None only for stage-0 bwd")
    size: int = Field(default=0, ge=0, le=_MAX_BYTES)
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

    hop_id: str = _hop_id()
    reason: FailReason
    detail: str = Field(default="", max_length=1000)


class Ack(_Model):
    """Generic success answer."""

    ok: bool = True
    message: str = Field(default="", max_length=1000)


class StepDone(_Model):
    """POST /v1/steps/done: the miner took inner step `inner_step` over `samples` samples."""

    round: int = _round()
    inner_step: int = Field(ge=0, le=_MAX_INT)
    samples: int = Field(ge=0, le=1_000_000)


class StepAck(_Model):
    """Answer to steps/done: the miner's next inner step."""

    round: int = _round()
    inner_step: int = Field(ge=0, le=_MAX_INT)


class DatasetFile(_Model):
    """Path parameter of `GET /v1/dataset/{name}`: a file the run's dataset manifest lists."""

    name: str = Field(min_length=1, max_length=256)


class StageRound(_Model):
    """Path parameters of the per-stage round routes (`/v1/rounds/{round}/stages/{stage}/...`)."""

    round: int = _round()
    stage: int = Field(ge=0, le=63)


class HopLogQuery(_Model):
    """Query of `GET /v1/validator/hoplog`: one round, optionally one miner."""

    round: int = _round()
    hotkey: Optional[str] = Field(default=None, max_length=64)


class UploadRequest(_Model):
    """POST /v1/rounds/upload: ask for a presigned PUT for a pseudo-gradient or a merged state."""

    round: int = _round()
    kind: Literal["pseudograd", "state"]
    sha256: str = _sha()
    size: int = Field(ge=1, le=_MAX_BYTES)


class UploadGrant(_Model):
    """A presigned PUT for exactly `size` bytes at `key` (content-addressed)."""

    put_url: str = _url()
    key: str = _key()
    expires_at: float = Field(ge=0)


class PseudogradReport(_Model):
    """POST /v1/rounds/pseudograd: pseudo-gradient uploaded at the staging `key` of its grant.
    Its merge weight is the bridge's count of the replica's verified backwards, not a claim."""

    round: int = _round()
    key: str = _key()
    sha256: str = _sha()
    size: int = Field(ge=1, le=_MAX_BYTES)


class MergeItem(_Model):
    """One replica's pseudo-gradient in a frozen merge set."""

    hotkey: str = _hotkey()
    stage: int = Field(default=0, ge=0, le=63)
    key: str = _key()
    sha256: str = _sha()
    size: int = Field(ge=1, le=_MAX_BYTES)
    samples: int = Field(ge=0, le=1_000_000, description="backwards the bridge verified")
    epoch: int = Field(default=0, ge=0, le=_MAX_INT, description="registration epoch that reported it")
    get_url: str = _url()


class MergeSet(_Model):
    """GET /v1/rounds/{r}/stages/{s}/pseudograds once frozen; items in fixed (hotkey) order."""

    round: int = _round()
    stage: int = Field(ge=0, le=63)
    items: list[MergeItem] = Field(max_length=1024)


class ShardPlan(_Model):
    """GET /v1/rounds/{r}/stages/{s}/shards once frozen: who merges each shard this round
    (resbm.shards.assign_mergers over the frozen set; a small stage uses the first rows only)."""

    round: int = _round()
    stage: int = Field(ge=0, le=63)
    shards: int = Field(ge=1, le=4096)
    mergers: list[list[str]] = Field(max_length=4096)


class MergedReport(_Model):
    """POST /v1/rounds/merged: sha256 of the state (theta, momentum) this replica computed."""

    round: int = _round()
    sha256: str = _sha()
    key: str = _key()


class MergedAck(_Model):
    """Answer to merged: whether the stage's round r+1 state is published, and which it is."""

    published: bool
    agreed: Optional[bool] = Field(default=None, description="None until published")
    state: Optional[StateRef] = None


class StageMetrics(_Model):
    """Counters for one stage."""

    stage: int = Field(ge=0, le=63)
    replicas: int = Field(ge=0)
    healthy_replicas: int = Field(ge=0)
    hops_done: int = Field(ge=0)
    throughput: float = Field(ge=0, description="sum of replicas' EMA hops/s")
    lease_expiries: int = Field(ge=0)
    reroutes: int = Field(ge=0)
    bytes_moved: int = Field(ge=0)
    state_sha: Optional[str] = None
    published_round: int = Field(ge=-1)


class MinerMetrics(_Model):
    """Counters for one miner."""

    hotkey: str = _hotkey()
    stage: int = Field(ge=0, le=63)
    healthy: bool
    health: float
    throughput: float = Field(ge=0)
    hops_done: int = Field(ge=0)
    lease_expiries: int = Field(ge=0)
    failures: int = Field(ge=0)
    bytes_moved: int = Field(ge=0)
    inner_step: int = Field(ge=0)
    merge_disagreements: int = Field(ge=0)
    bad_outputs: int = Field(default=0, ge=0, description="hop outputs the bridge proved wrong")
    false_claims: int = Field(default=0, ge=0, description="bad-input claims the bridge disproved")


class Metrics(_Model):
    """GET /v1/metrics."""

    run_id: str = Field(max_length=64)
    round: int = _round()
    phase: Phase
    samples_total: int = Field(ge=0)
    samples_completed: int = Field(ge=0)
    samples_abandoned: int = Field(ge=0)
    abandoned_total: int = Field(ge=0, description="over all rounds")
    completed_total: int = Field(ge=0, description="over all rounds")
    abandon_reasons: dict[str, int] = Field(default_factory=dict, max_length=64)
    stages: list[StageMetrics] = Field(max_length=64)
    miners: list[MinerMetrics] = Field(max_length=100_000)
    recent_losses: list[float] = Field(default_factory=list, max_length=1024)
    db_commits: int = Field(default=0, ge=0, description="SQLite transactions since start")
    db_rows_written: int = Field(default=0, ge=0, description="SQLite rows written since start")


class HopRecord(_Model):
    """One completed hop, for validator replay; URLs are presigned GETs."""

    hop_id: str = _hop_id()
    sample_id: int = Field(ge=0)
    round: int = _round()
    stage: int = Field(ge=0, le=63)
    kind: HopKind
    inner_step: int = Field(ge=0)
    epoch: int = Field(default=0, ge=0, le=_MAX_INT,
                       description="miner's registration epoch: a restarted miner begins anew from the round's state")
    recompute: bool
    miner_hotkey: str = _hotkey()
    act_in: Optional[ObjectRef] = None
    grad_in: Optional[ObjectRef] = None
    output: Optional[ObjectRef] = None
    loss: Optional[float] = None
    leased_at: float = Field(ge=0)
    done_at: float = Field(ge=0)
    device_class: DeviceClass = Field(default="cpu", description="the miner's declared device class")
    compute_dtype: ComputeDtype = Field(default="float32", description="the miner's declared compute dtype")


class Vote(_Model):
    """One replica's reported merged-state hash for its stage."""

    hotkey: str = _hotkey()
    stage: int = Field(ge=0, le=63)
    sha256: str = _sha()


class HopLog(_Model):
    """GET /v1/validator/hoplog: a round's completed hops (optionally of one miner), the stage
    states the round started from, its pseudo-gradients, and replicas flagged at merge."""

    round: int = _round()
    records: list[HopRecord] = Field(max_length=1_000_000)
    states: list[StateRef] = Field(default_factory=list, max_length=64)
    pseudograds: list[MergeItem] = Field(default_factory=list, max_length=10_000)
    votes: list[Vote] = Field(default_factory=list, max_length=10_000,
                              description="merged-state hashes the replicas reported")
    flagged: list[str] = Field(default_factory=list, max_length=10_000,
                               description="hotkeys whose vote differs from what was published "
                               "(information only: validators recompute and judge)")

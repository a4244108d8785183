"""Wire messages that read the run: health, run config, dataset files, metrics, and the
validators' hop log."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from protocol.round_messages import MergeItem
from protocol.run_config import RunConfig
from protocol.run_config import StrictModel as _Model
from protocol.wire_types import (MAX_INT, PROTOCOL_VERSION, ComputeDtype, DeviceClass, HopKind, ObjectRef,
                                 Phase, StateRef, device_name_field, hop_id_field, hotkey_field, round_field,
                                 sha_field)

__all__ = [
    "Health",
    "RunInfo",
    "DatasetFile",
    "StageMetrics",
    "MinerMetrics",
    "Metrics",
    "HopLogQuery",
    "HopRecord",
    "Vote",
    "HopLog",
]

class Health(_Model):
    """GET /health (unsigned)."""

    status: Literal["ok"] = "ok"
    hotkey: str = hotkey_field()
    protocol_version: str = Field(default=PROTOCOL_VERSION, max_length=32)
    netuid: Optional[int] = None  # the subnet the bridge serves (neurons check theirs against it)


class RunInfo(_Model):
    """GET /v1/run."""

    run: RunConfig
    bridge_hotkey: str = hotkey_field()
    protocol_version: str = Field(default=PROTOCOL_VERSION, max_length=32)


class DatasetFile(_Model):
    """Path parameter of `GET /v1/dataset/{name}`: a file the run's dataset manifest lists."""

    name: str = Field(min_length=1, max_length=256)


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

    hotkey: str = hotkey_field()
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
    standing: Literal["ok", "quarantined", "probation"] = Field(
        default="ok", description="quarantined: failed an audit, sits out; probation: failed an audit but "
        "is its stage's last live replica, so it keeps the stage training, unpaid")
    quarantined_until: int = Field(default=-1, ge=-1, description="round its quarantine lasts until")


class Metrics(_Model):
    """GET /v1/metrics."""

    run_id: str = Field(max_length=64)
    round: int = round_field()
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
    empty_rounds: int = Field(default=0, ge=0, description="closed rounds that completed no sample "
                              "(they do not count towards total_rounds)")
    last_empty_round: int = Field(default=-1, ge=-1, description="the latest such round (-1: none)")
    last_empty_reasons: dict[str, int] = Field(default_factory=dict, max_length=64,
                                               description="why its samples were abandoned")
    unpaid: list[str] = Field(default_factory=list, max_length=10_000,
                              description="replicas working this round on probation (unpaid)")
    db_commits: int = Field(default=0, ge=0, description="SQLite transactions since start")
    db_rows_written: int = Field(default=0, ge=0, description="SQLite rows written since start")


class HopLogQuery(_Model):
    """Query of `GET /v1/validator/hoplog`: one round, optionally one miner."""

    round: int = round_field()
    hotkey: Optional[str] = Field(default=None, max_length=64)


class HopRecord(_Model):
    """One completed hop, for validator replay; URLs are presigned GETs."""

    hop_id: str = hop_id_field()
    sample_id: int = Field(ge=0)
    round: int = round_field()
    stage: int = Field(ge=0, le=63)
    kind: HopKind
    inner_step: int = Field(ge=0)
    epoch: int = Field(default=0, ge=0, le=MAX_INT,
                       description="miner's registration epoch: a restarted miner begins anew from the round's state")
    recompute: bool
    miner_hotkey: str = hotkey_field()
    act_in: Optional[ObjectRef] = None
    grad_in: Optional[ObjectRef] = None
    output: Optional[ObjectRef] = None
    loss: Optional[float] = None
    leased_at: float = Field(ge=0)
    done_at: float = Field(ge=0)
    device_class: DeviceClass = Field(default="cpu", description="the miner's declared device class")
    compute_dtype: ComputeDtype = Field(default="float32", description="the miner's declared compute dtype")
    device_name: str = device_name_field()


class Vote(_Model):
    """One replica's reported merged-state hash for its stage."""

    hotkey: str = hotkey_field()
    stage: int = Field(ge=0, le=63)
    sha256: str = sha_field()


class HopLog(_Model):
    """GET /v1/validator/hoplog: a round's completed hops (optionally of one miner), the stage
    states the round started from, its pseudo-gradients, and replicas flagged at merge."""

    round: int = round_field()
    records: list[HopRecord] = Field(max_length=1_000_000)
    states: list[StateRef] = Field(default_factory=list, max_length=64)
    pseudograds: list[MergeItem] = Field(default_factory=list, max_length=10_000)
    votes: list[Vote] = Field(default_factory=list, max_length=10_000,
                              description="merged-state hashes the replicas reported")
    flagged: list[str] = Field(default_factory=list, max_length=10_000,
                               description="hotkeys whose vote differs from what was published "
                               "(information only: validators recompute and judge)")
    unpaid: list[str] = Field(default_factory=list, max_length=10_000,
                              description="replicas that kept their stage training in this round after a "
                              "failed audit (probation): validators give them no credit for it")

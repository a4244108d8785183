"""`RunConfig`: everything fixed at the start of a run, and the strict base of every wire model."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.audit_tolerances import AuditTolerance
from protocol.incentives import IncentiveParams
from spec.activation_format import ActivationFormat
from spec.block_format import BlockFormat
from spec.dataset import DatasetRef
from spec.model_config import ModelConfig
from spec.wire_format import TensorRole, WireFormat

__all__ = ["MAX_BYTES", "StrictModel", "RunConfig"]

MAX_BYTES = 2**40


class StrictModel(BaseModel):
    """Base of every wire model: unknown fields refused, immutable, strings bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=8192)


class RunConfig(StrictModel):
    """Everything fixed at the start of a run; loaded from YAML by the bridge, served at /v1/run."""

    run_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="slug; prefixes object keys")
    model: dict[str, Any] = Field(
        max_length=64, description="spec.model_config.ModelConfig fields (`parsed_model()` validates them)")
    n_stages: int = Field(ge=1, le=64, description="pipeline stages S; must equal model n_stages")
    batch_size: int = Field(ge=1, le=4096, description="sequences per sample (micro-batch)")
    micro_batches_per_step: int = Field(ge=1, le=4096, description="A: forwards per inner step")
    inner_steps_per_round: int = Field(ge=1, le=100_000, description="H: inner steps per round")
    samples_per_round: int = Field(ge=1, le=1_000_000, description="N: samples minted per round")
    muon_lr: float = Field(gt=0, le=10, description="Muon learning rate (set explicitly)")
    adamw_lr: float = Field(gt=0, le=10, description="AdamW learning rate")
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=0, ge=0, le=10_000_000, description="inner warm-up steps")
    total_rounds: int = Field(ge=1, le=1_000_000, description="rounds in the run; sets the schedule")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    outer_lr: float = Field(default=0.7, gt=0, le=10, description="outer Nesterov SGD lr")
    outer_momentum: float = Field(default=0.9, ge=0, lt=1, description="outer Nesterov momentum")
    merge_method: Literal["robust"] = Field(
        default="robust", description="outer merge rule: resbm/robust_merge.py, docs/SECURITY.md")
    clip_factor: float = Field(default=2.0, ge=1, le=1000,
                               description="norm clip vs the lower-median norm (>= 3 replicas)")
    trim_fraction: float = Field(default=0.25, ge=0, lt=0.5,
                                 description="trimmed mean drops max(1, floor(R x this)) per side")
    ref_floor: float = Field(default=0.5, gt=0, le=1,
                             description="clip reference never below this x the previous round's")
    vote_timeout_seconds: float = Field(
        default=60.0, gt=0, le=86_400,
        description="after the merge set froze: how long votes may come in before a dispute")
    arbitration_timeout_seconds: float = Field(
        default=120.0, gt=0, le=86_400,
        description="how long a disputed stage waits for a validator's recomputation")
    quarantine_rounds: int = Field(default=4, ge=0, le=1_000_000,
                                   description="rounds a miner sits out after a failed audit")
    sync_mode: Literal["state", "sharded"] = Field(
        default="sharded", description="round-end sync: the sharded, compressed sync of merged updates "
        "(docs/CONTRACTS.md, 'Sharded replica sync'; the default, measured best in docs/BENCHMARKS.md), "
        "or the whole-state merge and vote")
    sync_codec: Literal["fp32", "int8", "int4", "int2"] = Field(
        default="int4", description="pseudo-gradient wire codec (spec/block_format.py; blockwise, per-block fp32 scale)")
    sync_merged_codec: Literal["fp32", "int8", "int4", "int2"] = Field(
        default="int8", description="merged-update wire codec; every replica applies the decoded update")
    sync_block: int = Field(default=256, ge=8, le=65_536,
                            description="values per codec block (one fp32 scale each); multiple of 8")
    sync_shards: int = Field(default=4, ge=1, le=4096,
                             description="shards of a stage's parameter vector, each merged on its own")
    sync_mergers: int = Field(default=3, ge=2, le=64,
                              description="replicas that merge each shard (>= 2: no replica decides alone)")
    checkpoint_every: int = Field(default=4, ge=1, le=100_000,
                                  description="K: a full state is written every K rounds; joiners replay updates since")
    data_seed: int = Field(ge=0, le=2**63 - 1)
    dataset: DatasetRef | None = Field(
        default=None, description="the dataset's manifest (URL or bucket key) + sha256; None: the shipped corpus")
    init_seed: int = Field(ge=0, le=2**63 - 1)
    lease_seconds: float = Field(default=60.0, gt=0, le=86_400, description="hop lease length")
    max_object_bytes: int = Field(default=64 * 2**20, ge=1, le=MAX_BYTES,
                                  description="cap on any object a presigned PUT allows")
    max_state_bytes: int = Field(default=4 * 2**30, ge=1, le=MAX_BYTES,
                                 description="cap on a pseudo-gradient or merged state object")
    max_attempts: int = Field(default=3, ge=1, le=100, description="attempts per hop before abandon")
    merge_timeout_seconds: float = Field(default=300.0, gt=0, le=86_400)
    audit_window_rounds: int = Field(default=4, ge=1, le=10_000,
                                     description="rounds whose objects are kept for audits")
    version_key: int = Field(default=1, ge=0, le=2**63 - 1, description="weights version key")
    val_tokens: int = Field(default=16_384, ge=0, le=2**30,
                            description="held-out tokens each validator evaluates the model of every round on "
                            "(the dashboard's validation loss; 0: off); the same fixed windows for all")
    incentives: IncentiveParams = Field(default_factory=IncentiveParams,
                                        description="scoring knobs every validator uses (docs/INCENTIVES.md)")
    audit_tolerances: list[AuditTolerance] = Field(
        default_factory=list, max_length=4096,
        description="calibrated replay-audit thresholds, keyed by what they were calibrated on "
        "(scripts/calibrate_audit.py writes them); a hop no entry covers is uncalibrated: held to gross "
        "bounds only, and no verdict rests on it (docs/VALIDATING.md)")

    @field_validator("model")
    @classmethod
    def _model_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k in v:
            if not isinstance(k, str) or not 0 < len(k) <= 64:
                raise ValueError(f"model: bad field name {k!r}")
        return v

    @field_validator("sync_block")
    @classmethod
    def _block_multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"sync_block={v} must be a multiple of 8 (codes pack into whole bytes)")
        return v

    @model_validator(mode="after")
    def _stages_match(self) -> "RunConfig":
        ms = self.model.get("n_stages")
        if ms is not None and ms != self.n_stages:
            raise ValueError(f"n_stages={self.n_stages} but model.n_stages={ms}: make them equal")
        sw = self.incentives.stage_weights
        if sw is not None and len(sw) != self.n_stages:
            raise ValueError(f"incentives.stage_weights has {len(sw)} entries but n_stages="
                             f"{self.n_stages}: give one weight per stage")
        return self

    def parsed_model(self) -> ModelConfig:
        """The run's model; ValueError (one line, naming the field) when `model` is not a valid one."""
        try:
            return ModelConfig.from_dict(dict(self.model))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"run config 'model' is not a valid model config: {exc}") from None

    def wire_format(self, role: TensorRole) -> WireFormat:
        """The codec that carries tensors of `role` in this run: the model's `wire_codec` for codes and
        their gradients, `sync_codec` for pseudo-gradient pieces, `sync_merged_codec` for merged updates."""
        if role in (TensorRole.ACTIVATION, TensorRole.ACTIVATION_GRAD):
            return ActivationFormat(self.parsed_model().wire_codec)
        if role is TensorRole.PSEUDO_GRADIENT:
            return BlockFormat(self.sync_codec, self.sync_block)
        if role is TensorRole.MERGED_UPDATE:
            return BlockFormat(self.sync_merged_codec, self.sync_block)
        raise ValueError(f"no codec carries tensors of role {role!r}")

    @property
    def sharded(self) -> bool:
        """Whether replicas sync with the sharded sync (the one place `sync_mode` is compared)."""
        return self.sync_mode == "sharded"

    @property
    def total_steps(self) -> int:
        """Inner optimizer steps over the whole run (for the lr schedule)."""
        return self.total_rounds * self.inner_steps_per_round


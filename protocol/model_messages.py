"""The published model of a round, as the public `GET /v1/model` route (and the bucket copy the
bridge writes at `protocol.keys.ModelKey`) describe it: everything `resbm-export` needs to rebuild the model
and check every byte against what the replicas voted for.

"Round R" is the model the merge at the end of round R published: the weights round R + 1 starts
from. Per stage, under `sync_mode: state` that is the published state (`state`, whose sha256 the
replicas' strict majority or a validator's recomputation decided); under `sync_mode: sharded` it
is the last checkpoint (`state`, None: the init from `run.init_seed`) plus the decided updates of
rounds `checkpoint_round`..R, each shard's sha256 decided by its mergers (neurons.sync_follow
replays them). In the bucket copy every `url` and `alt_urls` entry is an object key instead.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from protocol.run_config import RunConfig
from protocol.run_config import StrictModel as _Model
from protocol.sync_api import RoundUpdate
from protocol.wire_types import MAX_INT, StateRef, round_field

__all__ = ["ModelQuery", "ModelStage", "ValidationFigure", "PublishedModel"]


class ModelQuery(_Model):
    """Query of `GET /v1/model`: a round (default: the latest with a published model)."""

    round: Optional[int] = Field(default=None, ge=0, le=MAX_INT)


class ModelStage(_Model):
    """One stage's weights after the round: a state, or a checkpoint plus decided updates."""

    stage: int = Field(ge=0, le=63)
    state: Optional[StateRef] = Field(default=None, description="whole state, or the sharded sync's checkpoint")
    checkpoint_round: int = Field(default=0, ge=0, le=MAX_INT, description="round the checkpoint starts")
    updates: list[RoundUpdate] = Field(default_factory=list, max_length=100_000,
                                       description="decided updates of rounds checkpoint_round..round")


class ValidationFigure(_Model):
    """Validators' held-out loss of a round's model: the median of their reports."""

    loss: float = Field(gt=0)
    validators: int = Field(ge=1)
    tokens: int = Field(ge=1, le=MAX_INT)


class PublishedModel(_Model):
    """`GET /v1/model`: the model after round `round`, verifiable stage by stage."""

    run: RunConfig
    round: int = round_field()
    latest: int = Field(ge=0, le=MAX_INT, description="the latest round with a published model")
    samples: Optional[int] = Field(default=None, ge=0, le=MAX_INT,
                                   description="samples completed through round `round`")
    training_loss: Optional[float] = Field(default=None, description="mean last-stage hop loss of the round")
    validation: Optional[ValidationFigure] = None
    stages: list[ModelStage] = Field(min_length=1, max_length=64)

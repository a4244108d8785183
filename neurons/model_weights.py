"""A published stage's weights, rebuilt and checked byte by byte: the whole-state run's voted state,
or the sharded run's checkpoint plus its decided updates (neurons.sync_choice picks which;
neurons.model_fetch is the entry point)."""
from __future__ import annotations

from typing import Any

import torch

from neurons.copies import first_good_copy
from neurons.shard_sync import sync_settings
from neurons.sync_follow import start_of_round
from neurons.transfer import HashMismatch, TransferError
from protocol.model_messages import ModelStage, PublishedModel
from protocol.sync_api import SyncView
from resbm.config import ModelConfig
from resbm.outer import OuterError, load_state
from resbm.stages import Stage, build_stages

__all__ = ["ModelUnavailable", "stage_shapes", "whole_state_weights", "sharded_weights"]

Getter = Any  # anything with get_verified(url_or_key, sha256, max_bytes, what) -> bytes


class ModelUnavailable(Exception):
    """No verifiable model for the request: the message says why (one line) and what to do."""


def stage_shapes(cfg: ModelConfig, stage: int) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's shape of a stage (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in Stage(cfg, stage).state_dict().items()}


def whole_state_weights(getter: Getter, pm: PublishedModel, st: ModelStage, cfg: ModelConfig,
                        shapes: dict) -> dict[str, torch.Tensor]:
    """A whole-state run's stage weights: any voter's copy of the published state that checks out."""
    ref, limit = st.state, pm.run.max_state_bytes
    if ref is None:
        raise ModelUnavailable(f"stage {st.stage} has no published state")

    def read(url: str) -> dict[str, torch.Tensor]:
        return load_state(getter.get_verified(url, ref.sha256, limit, f"stage {st.stage} state"), shapes, limit).theta
    try:
        return first_good_copy([ref.url, *ref.alt_urls], read, f"stage {st.stage} state")
    except TransferError as exc:
        last = exc.__cause__
    if isinstance(last, HashMismatch):
        why = f"fails its hash ({last})"
    elif isinstance(last, TransferError) and last.status == 404:
        why = "gone (a round's states are deleted after the run's audit_window_rounds: export a later round)"
    else:
        why = str(last)
    raise ModelUnavailable(f"stage {st.stage}: no copy of the state the replicas voted for "
                           f"({ref.sha256[:12]}..) is usable: {why}")


def sharded_weights(getter: Getter, pm: PublishedModel, st: ModelStage, cfg: ModelConfig, shapes: dict
                    ) -> dict[str, torch.Tensor]:
    """A sharded run's stage weights: its checkpoint plus every decided update since, replayed."""
    view = SyncView(round=pm.round + 1, stage=st.stage, shards=pm.run.sync_shards, checkpoint=st.state,
                    checkpoint_round=st.checkpoint_round, updates=st.updates)
    sync = sync_settings(pm.run)

    def init_theta() -> dict[str, torch.Tensor]:
        return build_stages(cfg, seed=pm.run.init_seed, stages=[st.stage])[0].state_dict()
    try:
        start = start_of_round(getter, view, shapes, sync.layout(shapes), sync, pm.run.max_state_bytes, init_theta)
    except (TransferError, OuterError) as exc:
        raise ModelUnavailable(f"stage {st.stage}: the checkpoint and decided updates do not rebuild "
                               f"(a copy is missing or fails its hash): {exc}") from None
    return start.theta

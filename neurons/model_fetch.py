"""A published model, fetched and checked byte by byte: from the bridge (`GET /v1/model`, public,
presigned URLs; scripts/bucket_model.py reads the bridge's copy of it from the bucket alone). Every stage's state is verified against the sha256 its replicas voted for; under
the sharded sync the checkpoint and every decided update are, and the updates are replayed by
the replicas' own code (neurons.sync_follow). Nothing is unpickled: states are safetensors.

What comes back is each stage's weights, ready for resbm.export.stitch (resbm does no network I/O;
this module is where the bytes come from). Used by `resbm-export`, the validator's live held-out
loss and the localnet report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import httpx
import torch
from pydantic import ValidationError

from neurons.shard_sync import sync_settings
from neurons.sync_follow import start_of_round
from neurons.transfer import HashMismatch, TransferError
from protocol.model_messages import ModelStage, PublishedModel
from protocol.routes import route
from protocol.sync_api import SyncView
from resbm.config import ModelConfig
from resbm.outer import OuterError, load_state
from resbm.stages import Stage, build_stages

__all__ = ["ModelUnavailable", "FetchedModel", "published_from_bridge", "download_bytes", "stage_weights",
           "fetch_weights"]

Getter = Any  # anything with get_verified(url_or_key, sha256, max_bytes, what) -> bytes


class ModelUnavailable(Exception):
    """No verifiable model for the request: the message says why (one line) and what to do."""


def published_from_bridge(base_url: str, round_: Optional[int] = None, timeout: float = 60.0) -> PublishedModel:
    """The bridge's description of the model after `round_` (None: the latest)."""
    url = base_url.rstrip("/") + route("model").path
    try:
        r = httpx.get(url, params=None if round_ is None else {"round": round_}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ModelUnavailable(f"cannot reach the bridge at {base_url}: {exc}") from None
    if r.status_code == 404 and '"http_error"' in r.text:
        raise ModelUnavailable(f"{base_url} does not serve {route('model').path}: not a bridge, or one "
                               "older than this tool")
    if r.status_code != 200:
        try:
            why = r.json().get("message", r.text)
        except ValueError:
            why = r.text[:300]
        raise ModelUnavailable(f"the bridge has no model to give (HTTP {r.status_code}): {why}")
    try:
        return PublishedModel.model_validate_json(r.content)
    except ValidationError as exc:
        raise ModelUnavailable(f"the bridge's answer is not a published model: {str(exc)[:300]}") from None


def download_bytes(pm: PublishedModel) -> int:
    """Bytes the model's objects take (what a progress bar counts to)."""
    return sum((x.state.size if x.state else 0) + sum(u.size for upd in x.updates for u in upd.shards if u)
               for x in pm.stages)


def _shapes(cfg: ModelConfig, stage: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in Stage(cfg, stage).state_dict().items()}


def _whole_state(getter: Getter, pm: PublishedModel, st: ModelStage, shapes: dict) -> dict[str, torch.Tensor]:
    ref, last = st.state, None
    if ref is None:
        raise ModelUnavailable(f"stage {st.stage} has no published state")
    for url in [ref.url, *ref.alt_urls]:
        try:
            blob = getter.get_verified(url, ref.sha256, pm.run.max_state_bytes, f"stage {st.stage} state")
            return load_state(blob, shapes, pm.run.max_state_bytes).theta
        except HashMismatch as exc:
            last = f"fails its hash ({exc})"
        except TransferError as exc:
            last = str(exc) if exc.status != 404 else ("gone (a round's states are deleted after the run's "
                                                       "audit_window_rounds: export a later round)")
        except OuterError as exc:
            last = str(exc)
    raise ModelUnavailable(f"stage {st.stage}: no copy of the state the replicas voted for "
                           f"({ref.sha256[:12]}..) is usable: {last}")


def _sharded(getter: Getter, pm: PublishedModel, st: ModelStage, cfg: ModelConfig, shapes: dict
             ) -> dict[str, torch.Tensor]:
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


def stage_weights(getter: Getter, pm: PublishedModel, stage: int) -> dict[str, torch.Tensor]:
    """One stage's verified weights after round `pm.round`."""
    cfg = ModelConfig.from_dict(pm.run.model)
    st = next((x for x in pm.stages if x.stage == stage), None)
    if st is None:
        raise ModelUnavailable(f"stage {stage} is missing from the published model")
    shapes = _shapes(cfg, stage)
    if pm.run.sync_mode == "sharded":
        return _sharded(getter, pm, st, cfg, shapes)
    return _whole_state(getter, pm, st, shapes)


@dataclass
class FetchedModel:
    """A published model's description and every stage's verified weights, in stage order."""

    published: PublishedModel
    config: ModelConfig
    thetas: list[dict[str, torch.Tensor]]


def fetch_weights(getter: Getter, pm: PublishedModel) -> FetchedModel:
    """Every stage's verified weights (ModelUnavailable naming the first stage that fails)."""
    cfg = ModelConfig.from_dict(pm.run.model)
    found = sorted(x.stage for x in pm.stages)
    if found != list(range(cfg.n_stages)):
        raise ModelUnavailable(f"the published model lists stages {found}, the run has {cfg.n_stages}")
    return FetchedModel(pm, cfg, [stage_weights(getter, pm, s) for s in range(cfg.n_stages)])

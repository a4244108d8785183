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

from neurons.model_weights import ModelUnavailable, stage_shapes
from neurons.sync_choice import sync_for
from protocol.model_messages import PublishedModel
from protocol.routes import route
from resbm.config import ModelConfig

__all__ = ["ModelUnavailable", "FetchedModel", "published_from_bridge", "download_bytes", "stage_weights",
           "fetch_weights"]

Getter = Any  # anything with get_verified(url_or_key, sha256, max_bytes, what) -> bytes


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


def stage_weights(getter: Getter, pm: PublishedModel, stage: int) -> dict[str, torch.Tensor]:
    """One stage's verified weights after round `pm.round`."""
    cfg = ModelConfig.from_dict(pm.run.model)
    st = next((x for x in pm.stages if x.stage == stage), None)
    if st is None:
        raise ModelUnavailable(f"stage {stage} is missing from the published model")
    return sync_for(pm.run).stage_weights(getter, pm, st, cfg, stage_shapes(cfg, stage))


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

"""A published model, fetched and checked byte by byte: from the bridge (`GET /v1/model`, public,
presigned URLs) or from the bucket alone (the copy the bridge writes after every round, read with
S3 credentials). Every stage's state is verified against the sha256 its replicas voted for; under
the sharded sync the checkpoint and every decided update are, and the updates are replayed by
the replicas' own code (neurons.sync_follow). Nothing is unpickled: states are safetensors.

What comes back is each stage's weights, ready for resbm.export.stitch (resbm does no network I/O;
this module is where the bytes come from). Used by `resbm-export`, the validator's live held-out
loss and the localnet report.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
from resbm.dataset_store import DataError
from resbm.outer import OuterError, load_state
from resbm.stages import Stage, build_stages

__all__ = ["ModelUnavailable", "BucketObjects", "BucketSource", "FetchedModel", "published_from_bridge", "published_from_bucket",
           "download_bytes", "stage_weights", "fetch_weights"]

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


class BucketObjects:
    """Reads objects by key from one S3 bucket (boto3 client), bounded and checked like downloads."""

    def __init__(self, client: Any, bucket: str, on_bytes: Optional[Callable[[int], None]] = None) -> None:
        self.client, self.bucket, self.on_bytes = client, bucket, on_bytes

    def get(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes (TransferError when missing, unreadable or over `max_bytes`)."""
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise TransferError(f"s3://{self.bucket}/{key}: {code or exc}",
                                404 if code in ("404", "NoSuchKey", "NotFound") else None) from None
        except BotoCoreError as exc:
            raise TransferError(f"s3://{self.bucket}/{key}: {exc}") from None
        if int(obj.get("ContentLength", 0)) > max_bytes:
            raise TransferError(f"s3://{self.bucket}/{key} is over {max_bytes} bytes", 413)
        chunks, n = [], 0
        for chunk in obj["Body"].iter_chunks(1 << 20):
            n += len(chunk)
            if n > max_bytes:
                raise TransferError(f"s3://{self.bucket}/{key} is over {max_bytes} bytes", 413)
            chunks.append(chunk)
            if self.on_bytes is not None:
                self.on_bytes(len(chunk))
        return b"".join(chunks)

    def get_verified(self, key: str, sha256: str, max_bytes: int, what: str = "object") -> bytes:
        """`get`, then the sha256 check (HashMismatch when the bytes are not the recorded ones)."""
        data = self.get(key, max_bytes)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HashMismatch(f"{what}: sha256 differs from the recorded one")
        return data


class BucketSource:
    """A dataset's files in the bucket, next to its manifest key (a resbm.dataset_store.Source)."""

    def __init__(self, objects: BucketObjects, folder: str) -> None:
        self.objects, self.folder = objects, folder.strip("/")

    def _key(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name

    def describe(self, name: str) -> str:
        """The file's s3:// location."""
        return f"s3://{self.objects.bucket}/{self._key(name)}"

    def get_bytes(self, name: str, limit: int) -> bytes:
        """The whole (small) file."""
        try:
            return self.objects.get(self._key(name), limit)
        except TransferError as exc:
            raise DataError(str(exc)) from None

    def fetch_to(self, name: str, dest: Path) -> None:
        """Write the file to `dest`."""
        dest.write_bytes(self.get_bytes(name, 1 << 40))


def published_from_bucket(objects: BucketObjects, run_prefix: str, round_: Optional[int] = None) -> PublishedModel:
    """The bridge's bucket copy of the model after `round_` (None: the latest) under `run_prefix`
    (`runs/RUN_ID`, the run's folder in the bucket)."""
    prefix = run_prefix.strip("/")
    name = "latest.json" if round_ is None else f"round-{round_:08d}.json"
    key = f"{prefix}/model/{name}"
    try:
        raw = objects.get(key, 64 << 20)
    except TransferError as exc:
        if exc.status == 404:
            raise ModelUnavailable(f"no published model at s3://{objects.bucket}/{key}: the bridge writes it "
                                   "when a round's merge is published; check the run's prefix "
                                   "(s3://BUCKET/runs/RUN_ID) and the round") from None
        raise ModelUnavailable(f"cannot read s3://{objects.bucket}/{key}: {exc}") from None
    try:
        return PublishedModel.model_validate_json(raw)
    except ValidationError as exc:
        raise ModelUnavailable(f"s3://{objects.bucket}/{key} is not a published model: {str(exc)[:300]}") from None


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
        except (TransferError, OuterError) as exc:
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

"""The run's dataset on the bridge: its manifest checked against the run config at startup, and
`GET /v1/dataset/{file}` redirecting to a presigned GET of a file the manifest lists."""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Optional

from fastapi.responses import RedirectResponse, Response

from bridge.records import TransitionError
from protocol.http_fetch import FetchError, fetch_bytes
from protocol.messages import DatasetFile
from protocol.run_config import RunConfig
from spec.dataset import DEFAULT_VOCAB_SIZE, MANIFEST_MAX_BYTES, DatasetManifest, ManifestError, parse_manifest

__all__ = ["DatasetConfigError", "check_vocab", "fetch_manifest", "dataset_handler"]

log = logging.getLogger(__name__)


class DatasetConfigError(ValueError):
    """The run config's dataset cannot be read, fails its sha256, or disagrees with the model."""


def check_vocab(run: RunConfig, manifest: Optional[DatasetManifest]) -> None:
    """Raise DatasetConfigError unless model.vocab_size equals the dataset's (or the shipped one's)."""
    want = manifest.vocab_size if manifest is not None else DEFAULT_VOCAB_SIZE
    got = run.model.get("vocab_size", DEFAULT_VOCAB_SIZE)
    if got != want:
        what = (f"dataset {manifest.name!r} ({run.dataset.manifest}) has vocab {want}" if manifest is not None
                else f"the run names no dataset, so it trains on the shipped corpus (vocab {want})")
        raise DatasetConfigError(f"run config model.vocab_size={got!r} but {what}: set model.vocab_size: {want}")


def fetch_manifest(run: RunConfig, storage: Any, timeout: float = 30.0) -> Optional[DatasetManifest]:
    """The run's verified manifest (None when the run names no dataset); checks the model's vocab."""
    ref = run.dataset
    if ref is None:
        check_vocab(run, None)
        return None
    if not ref.is_url and storage is None:
        raise DatasetConfigError(f"dataset manifest {ref.manifest!r} is a bucket key, but the bridge has no "
                                 "S3 storage: pass --s3-endpoint, or name the manifest by https URL")
    url = ref.manifest if ref.is_url else storage.presign_get(ref.manifest, 300)
    try:
        raw = fetch_bytes(url, MANIFEST_MAX_BYTES, timeout)
    except FetchError as exc:
        if exc.status is not None:
            raise DatasetConfigError(f"cannot fetch the dataset manifest {ref.manifest}: HTTP {exc.status} "
                                     "(upload it with scripts/prepare_dataset.py --upload)") from None
        raise DatasetConfigError(f"cannot fetch the dataset manifest {ref.manifest}: {exc}") from None
    try:
        manifest = parse_manifest(raw, ref.sha256, where=f"dataset manifest {ref.manifest}")
    except ManifestError as exc:
        raise DatasetConfigError(str(exc)) from None
    check_vocab(run, manifest)
    log.info("dataset %s: vocab %d, %d shards, %d train tokens", manifest.name, manifest.vocab_size,
             len(manifest.shards), manifest.split_tokens("train"))
    return manifest


def dataset_handler(run: RunConfig, storage: Any, manifest: Optional[DatasetManifest],
                    ttl: float) -> Callable[[None, DatasetFile], Awaitable[Response]]:
    """`GET /v1/dataset/{name}`: 307 to a presigned GET of manifest.json or a file it lists (public data)."""
    files: set[str] = set()
    prefix = ""
    if manifest is not None and run.dataset is not None and not run.dataset.is_url:
        prefix = run.dataset.manifest.rsplit("/", 1)[0] + "/" if "/" in run.dataset.manifest else ""
        files = {"manifest.json", manifest.tokenizer.name, *(s.name for s in manifest.shards)}

    async def get_dataset_file(caller: None, req: DatasetFile) -> Response:
        if not files:
            raise TransitionError("no_dataset", "this run's dataset is not served by the bridge "
                                  "(the run config names none, or names it by URL)")
        if req.name not in files:
            raise TransitionError("unknown_file", f"the run's dataset has no file {req.name!r}")
        key = run.dataset.manifest if req.name == "manifest.json" else prefix + req.name
        return RedirectResponse(storage.presign_get(key, int(ttl)), status_code=307)
    return get_dataset_file

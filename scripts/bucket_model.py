"""A published model from the bucket alone: the description the bridge writes there after every
round (`protocol.keys.ModelKey`, object keys in place of URLs) and its objects, read
with S3 credentials (read access is enough) and checked like downloads; also the run's dataset
files next to a bucket-key manifest. The weights are then rebuilt by neurons.model_fetch."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import ValidationError

from neurons.model_fetch import ModelUnavailable
from neurons.transfer import HashMismatch, TransferError, read_bounded
from protocol.keys import model_key_in
from protocol.model_messages import PublishedModel
from resbm.dataset_store import DataError

__all__ = ["BucketObjects", "BucketSource", "published_from_bucket"]


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
        return read_bounded(obj["Body"].iter_chunks(1 << 20), max_bytes, f"s3://{self.bucket}/{key}", self.on_bytes)

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
    key = model_key_in(run_prefix, round_)
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

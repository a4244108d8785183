"""S3 object store access for the bridge: presigned GET/PUT (SigV4, path-style), HEAD, list,
prefix delete for GC, server-side copy (hop outputs are sealed at `done` without passing
through the bridge) and a bounded GET (only to judge a disputed hop output, a few KB)."""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

__all__ = ["Storage", "StorageError"]

log = logging.getLogger(__name__)


class StorageError(Exception):
    """The object store failed or answered unexpectedly."""


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


class Storage:
    """One bucket on an S3-compatible endpoint."""

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str,
                 region: str = "us-east-1", create_bucket: bool = True) -> None:
        self.endpoint, self.bucket = endpoint, bucket
        cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                     retries={"max_attempts": 3, "mode": "standard"},
                     connect_timeout=5, read_timeout=30, max_pool_connections=32)
        self.client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                                   aws_secret_access_key=secret_key, region_name=region,
                                   config=cfg)
        if create_bucket:
            self.ensure_bucket()

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:  # another bridge process created it just now
                if exc.response.get("Error", {}).get("Code") not in (
                        "BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                    raise
                self.client.head_bucket(Bucket=self.bucket)  # ours to use after all?
                return
            log.info("created bucket %s at %s", self.bucket, self.endpoint)

    def presign_get(self, key: str, expires: int) -> str:
        """A GET URL for `key` valid `expires` seconds."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=max(1, int(expires)))

    def presign_put(self, key: str, size: int, expires: int) -> str:
        """A PUT URL for exactly `size` bytes at `key`, valid `expires` seconds."""
        return self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key, "ContentLength": int(size)},
            ExpiresIn=max(1, int(expires)))

    def head(self, key: str) -> Optional[int]:
        """Size of the object at `key`, or None when it does not exist."""
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise StorageError(f"HEAD {key}: {exc}") from exc
        return int(r["ContentLength"])

    def copy(self, src: str, dst: str, size: int = 0) -> bool:
        """Server-side copy `src` -> `dst` (the bytes never pass through the bridge): one
        CopyObject up to S3's 5 GiB limit, a multipart copy above it; False when `src` is missing."""
        source = {"Bucket": self.bucket, "Key": src}
        try:
            if size < 5 * 2**30:
                self.client.copy_object(Bucket=self.bucket, Key=dst, CopySource=source)
            else:
                self.client.copy(source, self.bucket, dst)
        except ClientError as exc:
            if _missing(exc):
                return False
            raise StorageError(f"COPY {src} -> {dst}: {exc}") from exc
        except KeyError as exc:  # a server answering without an ETag
            raise StorageError(f"COPY {src} -> {dst}: {exc}") from exc
        return True

    def get(self, key: str, max_bytes: int) -> Optional[bytes]:
        """The object's bytes (at most `max_bytes` + 1 are read), or None when it is missing."""
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise StorageError(f"GET {key}: {exc}") from exc
        body = r["Body"]
        try:
            return body.read(max_bytes + 1)
        finally:
            body.close()

    def put(self, key: str, data: bytes) -> None:
        """Upload bytes directly (tools and tests; miners use presigned PUTs)."""
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix`."""
        keys: list[str] = []
        token: Optional[str] = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            r = self.client.list_objects_v2(**kw)
            # rclone omits KeyCount (and Contents) on an empty prefix
            keys.extend(o["Key"] for o in r.get("Contents", []) or [])
            if not r.get("IsTruncated"):
                return keys
            token = r.get("NextContinuationToken")

    def delete(self, keys: Iterable[str]) -> int:
        """Delete the given keys (missing ones are no error); returns how many were asked."""
        doomed = list(keys)
        for i in range(0, len(doomed), 1000):
            batch = [{"Key": k} for k in doomed[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(doomed)

    def delete_prefix(self, prefix: str, keep: Iterable[str] = ()) -> int:
        """Delete every key under `prefix` except those in `keep`; returns how many went."""
        keep = set(keep)
        return self.delete(k for k in self.list(prefix) if k not in keep)

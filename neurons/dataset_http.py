"""Dataset files over HTTP (a public bucket, or the bridge's /v1/dataset/ redirecting to S3): the
remote `Source` that resbm.dataset takes from its callers, so the model package does no network I/O."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx

from protocol.http_fetch import FetchError, fetch_bytes
from resbm.dataset_store import DataError

__all__ = ["HttpSource"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class HttpSource:
    """Files under a base URL (a public bucket, or the bridge's /v1/dataset/ redirecting to S3)."""

    def __init__(self, base_url: str, timeout: float = 60.0, attempts: int = 3) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout, self.attempts = timeout, attempts

    def describe(self, name: str) -> str:
        """The file's URL."""
        return self.base_url + name

    def get_bytes(self, name: str, limit: int) -> bytes:
        """The whole (small) file, at most `limit` bytes."""
        try:
            return fetch_bytes(self.describe(name), limit, self.timeout, self.attempts)
        except FetchError as exc:
            raise DataError(str(exc)) from None

    def fetch_to(self, name: str, dest: Path) -> None:
        """Stream the file to `dest`, retrying transport errors with backoff."""
        url = self.describe(name)
        for attempt in range(self.attempts):
            try:
                with httpx.stream("GET", url, timeout=self.timeout, follow_redirects=True) as r:
                    if r.status_code != 200:
                        raise DataError(f"cannot fetch {url}: HTTP {r.status_code}")
                    with open(dest, "wb") as out:
                        for chunk in r.iter_bytes(_CHUNK):
                            out.write(chunk)
                return
            except httpx.TransportError as exc:
                if attempt + 1 == self.attempts:
                    raise DataError(f"cannot fetch {url}: {exc}") from None
                log.warning("fetching %s failed (%s); retrying", url, exc)
                time.sleep(0.5 * 2**attempt)

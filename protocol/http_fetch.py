"""One GET of a public URL with a byte limit: the dataset manifest the bridge checks at start-up
and the small dataset files neurons read (`neurons.dataset_http`). Redirects are followed (the
bridge's /v1/dataset/ answers with presigned S3 URLs); a body over the limit is refused as it
streams in, never held whole; transport errors are retried with back-off."""
from __future__ import annotations

import logging
import time

import httpx

__all__ = ["FetchError", "fetch_bytes"]

log = logging.getLogger(__name__)


class FetchError(Exception):
    """A URL that could not be read within its limit; `status` is the HTTP status, if one came."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _get_once(url: str, limit: int, timeout: float) -> bytes:
    with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as r:
        if r.status_code != 200:
            r.read()
            raise FetchError(f"cannot fetch {url}: HTTP {r.status_code} {r.text[:200]!r}", r.status_code)
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FetchError(f"{url}: {declared} bytes, more than the {limit} allowed")
        parts, have = [], 0
        for chunk in r.iter_bytes():
            have += len(chunk)
            if have > limit:
                raise FetchError(f"{url}: more than the {limit} bytes allowed")
            parts.append(chunk)
        return b"".join(parts)


def fetch_bytes(url: str, limit: int, timeout: float = 30.0, attempts: int = 1) -> bytes:
    """The body of `GET url` (at most `limit` bytes); FetchError, one line, when it cannot be had.
    Transport errors are tried `attempts` times in all; an HTTP error or an oversized body is final."""
    for attempt in range(attempts):
        try:
            return _get_once(url, limit, timeout)
        except httpx.TransportError as exc:
            if attempt + 1 == attempts:
                raise FetchError(f"cannot fetch {url}: {exc}") from None
            log.warning("fetching %s failed (%s); retrying", url, exc)
            time.sleep(0.5 * 2**attempt)
        except httpx.InvalidURL as exc:
            raise FetchError(f"cannot fetch {url}: {exc}") from None
    raise AssertionError("unreachable")

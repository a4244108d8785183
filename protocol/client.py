"""`SignedClient`: a thin httpx client that signs every request to the bridge with btauth/1."""
from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

import httpx
from pydantic import BaseModel

from protocol.auth import sign_headers

__all__ = ["BridgeError", "SignedClient", "fetch_receiver_hotkey"]

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class BridgeError(Exception):
    """The bridge answered with an error status; `detail` is the server's message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"bridge error {status}: {detail}")
        self.status = status
        self.detail = detail

    @property
    def code(self) -> str:
        """The refusal's error code (`ErrorBody.error`, protocol/errors.py), or "" when none."""
        try:
            body = json.loads(self.detail)
        except ValueError:
            return ""
        return str(body.get("error", "")) if isinstance(body, dict) else ""


def _detail(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, dict) and "detail" in data:
        d = data["detail"]
        return d if isinstance(d, str) else json.dumps(d)[:2000]
    return json.dumps(data)[:2000]


def fetch_receiver_hotkey(base_url: str, timeout: float = 10.0) -> str:
    """Read the bridge's hotkey from its unsigned `GET /health`."""
    resp = httpx.get(base_url.rstrip("/") + "/health", timeout=timeout)
    if resp.status_code != 200:
        raise BridgeError(resp.status_code, _detail(resp))
    hotkey = resp.json().get("hotkey")
    if not isinstance(hotkey, str) or not hotkey:
        raise BridgeError(resp.status_code, "GET /health returned no 'hotkey' field")
    return hotkey


class SignedClient:
    """Signed JSON requests to one bridge, with bounded retries on transient errors."""

    def __init__(
        self,
        keypair: Any,
        base_url: str,
        receiver_ss58: str | None = None,
        timeout: float = 30.0,
        max_tries: int = 5,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
    ) -> None:
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.keypair = keypair
        self.base_url = base_url.rstrip("/")
        self.max_tries = max_tries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._receiver = receiver_ss58

    @property
    def receiver_ss58(self) -> str:
        """The bridge hotkey requests are bound to (fetched from /health on first use)."""
        if self._receiver is None:
            self._receiver = fetch_receiver_hotkey(self.base_url)
        return self._receiver

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict:
        """Signed GET; returns the decoded JSON object."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: BaseModel | dict | None = None) -> dict:
        """Signed POST of a pydantic model or dict as JSON; returns the decoded JSON object."""
        return self.request("POST", path, body=body)

    def request(self, method: str, path: str, body: BaseModel | dict | None = None,
                params: dict[str, Any] | None = None) -> dict:
        """Send one signed request (a fresh nonce on every try) and decode the JSON reply."""
        content = _encode(body)
        headers = {"content-type": "application/json"} if body is not None else {}
        last_exc: Exception | None = None
        for attempt in range(1, self.max_tries + 1):
            req = self._http.build_request(method, path, params=params, content=content,
                                           headers=headers)
            target = req.url.raw_path.decode("ascii")  # path + ?query exactly as sent
            req.headers.update(sign_headers(self.keypair, method, target, content,
                                            self.receiver_ss58))
            try:
                resp = self._http.send(req)
            except (httpx.TransportError,) as exc:
                last_exc = exc
                log.warning("%s %s: %s (try %d/%d)", method, path, exc, attempt, self.max_tries)
            else:
                if resp.status_code < 400:
                    return _json(resp)
                if resp.status_code not in _RETRY_STATUS:
                    raise BridgeError(resp.status_code, _detail(resp))
                last_exc = BridgeError(resp.status_code, _detail(resp))
                log.warning("%s %s: %s (try %d/%d)", method, path, last_exc, attempt,
                            self.max_tries)
            if attempt < self.max_tries:
                time.sleep(self._delay(attempt))
        assert last_exc is not None
        raise last_exc

    def _delay(self, attempt: int) -> float:
        cap = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
        return cap * (0.5 + random.random() / 2)  # jitter in [cap/2, cap]

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __enter__(self) -> SignedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode(body: BaseModel | dict | None) -> bytes:
    if body is None:
        return b""
    if isinstance(body, BaseModel):
        return body.model_dump_json().encode()
    if isinstance(body, dict):
        return json.dumps(body, separators=(",", ":")).encode()
    raise TypeError(f"body must be a pydantic model or dict, got {type(body).__name__}")


def _json(resp: httpx.Response) -> dict:
    if not resp.content:
        return {}
    try:
        data = resp.json()
    except ValueError as exc:
        raise BridgeError(resp.status_code, f"response is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BridgeError(resp.status_code, f"expected a JSON object, got {type(data).__name__}")
    return data

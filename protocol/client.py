"""`SignedClient`: a thin httpx client that signs every request to the bridge with btauth/1.

It may be given several bridge URLs (a list, or one string with commas): the bridge processes
of one run, all answering for the same hotkey. Requests go to one of them until it fails to
answer (a transport error, 502/503/504); that one is then skipped with a growing back-off
(`BridgeUrls`) and the request is sent to the next at once."""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any, Callable, Sequence

import httpx
from pydantic import BaseModel

from protocol.auth import sign_headers

__all__ = ["BridgeError", "SignedClient", "BridgeUrls", "fetch_receiver_hotkey", "split_urls"]

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_DOWN_STATUS = frozenset({502, 503, 504})  # a proxy or server saying this bridge is not there


def split_urls(urls: "str | Sequence[str]") -> list[str]:
    """Bridge base URLs from a list or a comma-separated string (trailing '/' dropped)."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [u.strip().rstrip("/") for u in items if u and u.strip()]
    if not out:
        raise ValueError("no bridge URL given")
    return out


class BridgeUrls:
    """Which of several bridge URLs to use: the current one until it fails, then the next one
    not in back-off (a failed URL waits `first` s, doubling per failure up to `cap`)."""

    def __init__(self, urls: Sequence[str], first: float = 0.5, cap: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.urls, self.first, self.cap, self.clock = list(urls), first, cap, clock
        self.current = 0
        self._fails = [0] * len(self.urls)
        self._until = [0.0] * len(self.urls)

    def pick(self) -> int:
        """The index to send to: the current one if it is not in back-off, else the next that
        is not, else the one whose back-off ends first."""
        now, n = self.clock(), len(self.urls)
        for k in range(n):
            i = (self.current + k) % n
            if self._until[i] <= now:
                self.current = i
                return i
        self.current = min(range(n), key=lambda i: self._until[i])
        return self.current

    def failed(self, i: int) -> None:
        """URL `i` did not answer: back it off and move on."""
        self._fails[i] += 1
        self._until[i] = self.clock() + min(self.cap, self.first * 2 ** (self._fails[i] - 1))
        if len(self.urls) > 1:
            self.current = (i + 1) % len(self.urls)

    def ok(self, i: int) -> None:
        """URL `i` answered."""
        self._fails[i], self._until[i] = 0, 0.0

    def all_down(self) -> bool:
        """Every URL is in back-off now."""
        now = self.clock()
        return all(u > now for u in self._until)


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
    """Signed JSON requests to a bridge (or to the first answering of several), with bounded
    retries on transient errors."""

    def __init__(
        self,
        keypair: Any,
        base_url: "str | Sequence[str]",
        receiver_ss58: str | None = None,
        timeout: float = 30.0,
        max_tries: int = 5,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
    ) -> None:
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.keypair = keypair
        self.urls = BridgeUrls(split_urls(base_url), first=backoff_s * 2, cap=max_backoff_s * 4)
        self.max_tries = max_tries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._http = [httpx.Client(base_url=u, timeout=timeout) for u in self.urls.urls]
        self._receiver = receiver_ss58
        self._tries = threading.local()

    @property
    def last_tries(self) -> int:
        """HTTP round trips the calling thread's last request took (retries included)."""
        return getattr(self._tries, "n", 1)

    @property
    def base_url(self) -> str:
        """The bridge URL in use now."""
        return self.urls.urls[self.urls.current]

    @property
    def receiver_ss58(self) -> str:
        """The bridge hotkey requests are bound to (fetched from /health on first use, from the
        first bridge that answers)."""
        if self._receiver is None:
            last: Exception | None = None
            for _ in range(len(self.urls.urls)):
                i = self.urls.pick()
                try:
                    self._receiver = fetch_receiver_hotkey(self.urls.urls[i])
                    break
                except (httpx.TransportError, BridgeError) as exc:
                    last = exc
                    self.urls.failed(i)
            else:
                assert last is not None
                raise last
        return self._receiver

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict:
        """Signed GET; returns the decoded JSON object."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: BaseModel | dict | None = None) -> dict:
        """Signed POST of a pydantic model or dict as JSON; returns the decoded JSON object."""
        return self.request("POST", path, body=body)

    def request(self, method: str, path: str, body: BaseModel | dict | None = None,
                params: dict[str, Any] | None = None) -> dict:
        """Send one signed request (a fresh nonce on every try) and decode the JSON reply; a
        bridge that does not answer is skipped for the next one at once."""
        content = _encode(body)
        headers = {"content-type": "application/json"} if body is not None else {}
        last_exc: Exception | None = None
        for attempt in range(1, self.max_tries + 1):
            self._tries.n = attempt
            i = self.urls.pick()
            http = self._http[i]
            req = http.build_request(method, path, params=params, content=content,
                                     headers=headers)
            target = req.url.raw_path.decode("ascii")  # path + ?query exactly as sent
            req.headers.update(sign_headers(self.keypair, method, target, content,
                                            self.receiver_ss58))
            try:
                resp = http.send(req)
            except (httpx.TransportError,) as exc:
                last_exc = exc
                self.urls.failed(i)
                log.warning("%s %s at %s: %s (try %d/%d)", method, path, self.urls.urls[i], exc,
                            attempt, self.max_tries)
            else:
                if resp.status_code < 400:
                    self.urls.ok(i)
                    return _json(resp)
                if resp.status_code not in _RETRY_STATUS:
                    raise BridgeError(resp.status_code, _detail(resp))
                last_exc = BridgeError(resp.status_code, _detail(resp))
                if resp.status_code in _DOWN_STATUS:
                    self.urls.failed(i)
                log.warning("%s %s at %s: %s (try %d/%d)", method, path, self.urls.urls[i],
                            last_exc, attempt, self.max_tries)
            if attempt < self.max_tries and (self.urls.all_down() or len(self.urls.urls) == 1
                                             or resp_is_busy(last_exc)):
                time.sleep(self._delay(attempt))
        assert last_exc is not None
        raise last_exc

    def _delay(self, attempt: int) -> float:
        cap = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
        return cap * (0.5 + random.random() / 2)  # jitter in [cap/2, cap]

    def close(self) -> None:
        """Close the underlying connection pools."""
        for http in self._http:
            http.close()

    def __enter__(self) -> SignedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resp_is_busy(exc: Exception | None) -> bool:
    """A 429 or 500: the bridge answered, so another one would not do better right now."""
    return isinstance(exc, BridgeError) and exc.status in (429, 500)


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

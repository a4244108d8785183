"""A shortcut for the hot signed-JSON POST routes (the table's `fast` routes: lease, hop done).

Those two routes are most of the bridge's traffic, and FastAPI's per-request machinery
(routing, exception and exit-stack middleware, dependency solving) costs about as much as the
work itself. This ASGI middleware answers them directly through the same `Endpoint` (auth,
request model, handler) and the same error mapping as the FastAPI routes, which stay
registered (OpenAPI, and every other route)."""
from __future__ import annotations

from typing import Any, Optional

from starlette.datastructures import Headers

from bridge.web import Endpoint, answer, body_too_large, error_response_for
from protocol.auth import request_target

__all__ = ["FastPath"]


def _declared_size(scope: dict) -> int:
    """The request's Content-Length (0 when absent; over any limit when unreadable)."""
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            return int(v) if v.isdigit() else 1 << 62
    return 0


class FastPath:
    """ASGI middleware: answers POSTs to the paths of `endpoints` without FastAPI."""

    def __init__(self, app: Any, endpoints: dict[str, Endpoint], limit: int) -> None:
        self.app, self.limit = app, limit
        self.endpoints = {p: e for p, e in endpoints.items()
                          if e.route.fast and e.route.method == "POST"}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        ep = self.endpoints.get(scope.get("path", "")) if scope["type"] == "http" else None
        if ep is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if _declared_size(scope) > self.limit:  # as BodyCap would: before anything else
            return await error_response_for(body_too_large(self.limit))(scope, receive, send)

        async def body() -> bytes:
            got = await self._read(receive)
            if got is None:
                raise body_too_large(self.limit)
            return got
        resp = await answer(ep, Headers(scope=scope), body, request_target(scope), {}, {})
        await resp(scope, receive, send)

    async def _read(self, receive: Any) -> Optional[bytes]:
        chunks, size, more = [], 0, True
        while more:
            m = await receive()
            if m["type"] == "http.disconnect":
                return b""
            chunk = m.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            more = m.get("more_body", False)
        return b"".join(chunks)

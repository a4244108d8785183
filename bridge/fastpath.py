"""A shortcut for the hot signed-JSON POST routes (lease, hop done).

Those two routes are most of the bridge's traffic, and FastAPI's per-request machinery
(routing, exception and exit-stack middleware, dependency solving, response re-encoding) cost
about as much as the work itself. This ASGI middleware answers them directly: the same auth
function, the same pydantic request models, the same handler coroutines and the same error
bodies as the FastAPI routes, which stay registered (OpenAPI, and every other route)."""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from bridge.records import TransitionError
from protocol import messages as msg
from protocol.auth import request_target
from protocol.errors import http_status, retry_after

__all__ = ["FastPath", "error_response", "refusal_response"]

log = logging.getLogger(__name__)

Handler = Callable[[Any, str], Awaitable[Response]]
Auth = Callable[[Headers, bytes, str, str], str]


def error_response(status: int, code: str, message: str,
                   retry_after: float | None = None) -> Response:
    """The bridge's JSON error body (`ErrorBody`)."""
    body = msg.ErrorBody(error=code, message=message[:2000], retry_after=retry_after)
    return Response(body.model_dump_json(exclude_none=True), status_code=status,
                    media_type="application/json")


def refusal_response(exc: TransitionError) -> Response:
    """A refused transition's error body, its HTTP status from the one code table."""
    return error_response(http_status(exc.code), exc.code, exc.message, retry_after(exc.code))


def validation_message(exc: ValidationError) -> str:
    """`field: problem; ...` for the first few errors of a request body."""
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                     for e in exc.errors()[:5])


class FastPath:
    """ASGI middleware: `routes` maps a POST path to (request model, auth, handler)."""

    def __init__(self, app: Any, routes: dict[str, tuple[type[BaseModel], Auth, Handler]],
                 limit: int) -> None:
        self.app, self.routes, self.limit = app, routes, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        resp = await self._handle(scope, receive, *route)
        await resp(scope, receive, send)

    async def _read(self, receive: Any) -> bytes | None:
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

    async def _handle(self, scope: dict, receive: Any, model: type[BaseModel], auth: Auth,
                      handler: Handler) -> Response:
        body = await self._read(receive)
        if body is None:
            return error_response(413, "body_too_large", f"request body over {self.limit} bytes")
        try:
            caller = auth(Headers(scope=scope), body, "POST", request_target(scope))
            req = model.model_validate_json(body)
            return await handler(req, caller)
        except TransitionError as exc:
            return refusal_response(exc)
        except StarletteHTTPException as exc:
            return error_response(exc.status_code, "http_error", str(exc.detail))
        except ValidationError as exc:
            return error_response(400, "bad_request", validation_message(exc))
        except Exception:
            log.exception("%s failed", scope.get("path"))
            return error_response(500, "internal", "internal error; retry")

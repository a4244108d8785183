"""The web layer: register every route of `protocol.routes.ROUTES` on the app; each request is
auth -> parse the route's request model -> one handler call -> the response model as JSON.

Errors of every kind become an `ErrorBody` in `error_response_for`, the one place that maps
exceptions to HTTP; the FastAPI routes and the fast path (`bridge.fastpath`) both answer
through `answer`."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from bridge.auth import Authenticator
from bridge.records import TransitionError
from protocol import messages as msg
from protocol.auth import AuthFailed, request_target
from protocol.errors import http_status, retry_after
from protocol.routes import Route

__all__ = ["Endpoint", "answer", "body_too_large", "json_response", "error_response",
           "error_response_for", "mount", "BodyCap"]

log = logging.getLogger(__name__)

Handler = Callable[[Optional[str], Optional[BaseModel]], Awaitable[Any]]


def error_response(status: int, code: str, message: str,
                   retry_after: float | None = None) -> Response:
    """The bridge's JSON error body (`ErrorBody`)."""
    body = msg.ErrorBody(error=code, message=message[:2000], retry_after=retry_after)
    return Response(body.model_dump_json(exclude_none=True), status_code=status,
                    media_type="application/json")


def error_response_for(exc: Exception, where: str = "") -> Response:
    """The one mapping of an exception to an HTTP error answer."""
    if isinstance(exc, TransitionError):
        return error_response(http_status(exc.code), exc.code, exc.message, retry_after(exc.code))
    if isinstance(exc, AuthFailed):
        return error_response(exc.status_code, "http_error", str(exc))
    if isinstance(exc, StarletteHTTPException):
        return error_response(exc.status_code, "http_error", str(exc.detail))
    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                 for e in exc.errors()[:5]]
        return error_response(400, "bad_request", "; ".join(parts))
    log.error("%s failed", where or "request", exc_info=exc)
    return error_response(500, "internal", "internal error; retry")


def body_too_large(limit: int) -> TransitionError:
    """The refusal of a request body over `limit` bytes."""
    return TransitionError("body_too_large", f"request body over {limit} bytes")


def json_response(model: BaseModel) -> Response:
    """A response from a message model, serialised once."""
    return Response(content=model.model_dump_json(), media_type="application/json")


class Endpoint:
    """One route bound to its handler and the authenticator."""

    def __init__(self, route: Route, handler: Handler, auth: Authenticator) -> None:
        self.route, self.handler, self.auth = route, handler, auth

    def parse(self, body: bytes, path: Mapping[str, str], query: Mapping[str, str]) -> Any:
        """The route's request model from the body (POST) or path and query (GET)."""
        model = self.route.request
        if model is None:
            return None
        if self.route.method == "POST":
            return model.model_validate_json(body)
        return model.model_validate({**query, **path})

    async def __call__(self, headers: Mapping[str, str], body: bytes, target: str,
                       path: Mapping[str, str], query: Mapping[str, str]) -> Response:
        r = self.route
        caller = self.auth.verify(headers, body, r.method, target, r.role)  # `answer` prechecked
        out = await self.handler(caller, self.parse(body, path, query))
        return out if isinstance(out, Response) else json_response(out)


async def answer(ep: Endpoint, headers: Mapping[str, str], body_of: Callable[[], Awaitable[bytes]],
                 target: str, path: Mapping[str, str], query: Mapping[str, str]) -> Response:
    """Run an endpoint (the cheap auth checks before the body is read); any exception becomes its
    error answer."""
    try:
        ep.auth.precheck(headers, ep.route.role)
        return await ep(headers, await body_of(), target, path, query)
    except Exception as exc:  # noqa: BLE001 - every failure is answered, never dropped
        return error_response_for(exc, f"{ep.route.method} {ep.route.path}")


def _inline(node: Any, defs: dict) -> Any:
    """A JSON schema with its local `$defs` references replaced by the definitions."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.split("/")[-1]], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _openapi(route: Route) -> dict:
    """The route's JSON body in the OpenAPI document (GET parameters are not listed)."""
    if route.method != "POST" or route.request is None:
        return {}
    schema = route.request.model_json_schema()
    schema = _inline(schema, schema.get("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _fastapi_endpoint(ep: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await answer(ep, request.headers, request.body, request_target(request.scope),
                            request.path_params, request.query_params)
    return endpoint


def mount(app: FastAPI, routes: tuple[Route, ...], handlers: Mapping[str, Handler],
          auth: Authenticator) -> dict[str, Endpoint]:
    """Register `routes` (each needs a handler named like it); returns the endpoints by path."""
    missing = [r.name for r in routes if handlers.get(r.name) is None]
    if missing:
        raise ValueError(f"no handler for bridge routes {missing}")
    eps: dict[str, Endpoint] = {}
    for r in routes:
        ep = eps[r.path] = Endpoint(r, handlers[r.name], auth)
        app.add_api_route(r.path, _fastapi_endpoint(ep), methods=[r.method], name=r.name,
                          include_in_schema=r.in_schema, openapi_extra=_openapi(r))
    return eps


class BodyCap:
    """Pure ASGI middleware: 413 for bodies over `limit` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and (not v.isdigit() or int(v) > self.limit):
                return await error_response_for(body_too_large(self.limit))(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            m = await receive()
            seen += len(m.get("body", b""))
            if seen > self.limit:
                raise body_too_large(self.limit)
            return m
        await self.app(scope, counted, send)

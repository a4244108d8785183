"""No request is answered before its nonce is settled, whatever the route did.

Transitions settle their requests' nonces in their group commit. A request that commits
nothing (a GET, a refused call) would otherwise leave its nonce only in memory, and the same
signed request would be accepted again after a bridge restart. The auth step notes the nonce
store's `stored` count in a per-request slot; this ASGI middleware holds the response start
until `durable` has reached it, joining (or starting) a group commit when needed.

With several bridge processes (PostgreSQL) settling can refuse a request that passed the
in-memory checks: its nonce was used at another process first, or the hotkey is over its rate
counted over all processes. `wait` then raises, and the refusal (`refuse(exc)`) is sent instead
of whatever the route answered."""
from __future__ import annotations

import contextvars
from typing import Any, Awaitable, Callable, Optional

__all__ = ["DurableNonces", "note_nonce", "current_nonce"]

_SLOT: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("btauth_slot",
                                                                         default=None)


def note_nonce(stored: int) -> None:
    """Record that the current request's nonce is number `stored` in the store."""
    slot = _SLOT.get()
    if slot is not None:
        slot["seq"] = stored


def current_nonce() -> int:
    """The current request's nonce number (0 outside a signed request)."""
    slot = _SLOT.get()
    return 0 if slot is None else slot.get("seq", 0)


class DurableNonces:
    """ASGI middleware: `wait(seq)` returns once nonce `seq` is settled, or raises its refusal,
    which `refuse` turns into the response sent instead."""

    def __init__(self, app: Any, wait: Callable[[int], Awaitable[None]],
                 refuse: Optional[Callable[[Exception], Any]] = None) -> None:
        self.app, self.wait, self.refuse = app, wait, refuse

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        slot: dict = {}  # mutated, not re-set: visible even from a copied context
        token = _SLOT.set(slot)
        replaced = False

        async def send_when_durable(message: dict) -> None:
            nonlocal replaced
            if replaced:
                return  # the route's own answer is dropped: the refusal went out instead
            if message["type"] == "http.response.start" and "seq" in slot:
                try:
                    await self.wait(slot.pop("seq"))
                except Exception as exc:  # noqa: BLE001 - refused at settling
                    if self.refuse is None:
                        raise
                    replaced = True
                    await self.refuse(exc)(scope, _no_body, send)
                    return
            await send(message)
        try:
            await self.app(scope, receive, send_when_durable)
        finally:
            _SLOT.reset(token)


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}

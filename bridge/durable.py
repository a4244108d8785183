"""No request is answered before its nonce is on disk, whatever the route did.

Transitions persist their requests' nonces in their group commit. A request that commits
nothing (a GET, a refused call) would otherwise leave its nonce only in memory, and the same
signed request would be accepted again after a bridge restart. The auth step notes the nonce
store's `stored` count in a per-request slot; this ASGI middleware holds the response start
until `durable` has reached it, joining (or starting) a group commit when needed."""
from __future__ import annotations

import contextvars
from typing import Any, Awaitable, Callable, Optional

__all__ = ["DurableNonces", "note_nonce"]

_SLOT: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("btauth_slot",
                                                                         default=None)


def note_nonce(stored: int) -> None:
    """Record that the current request's nonce is number `stored` in the store."""
    slot = _SLOT.get()
    if slot is not None:
        slot["seq"] = stored


class DurableNonces:
    """ASGI middleware: `wait(seq)` must return once nonce `seq` is persisted."""

    def __init__(self, app: Any, wait: Callable[[int], Awaitable[None]]) -> None:
        self.app, self.wait = app, wait

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        slot: dict = {}  # mutated, not re-set: visible even from a copied context
        token = _SLOT.set(slot)

        async def send_when_durable(message: dict) -> None:
            if message["type"] == "http.response.start" and "seq" in slot:
                await self.wait(slot.pop("seq"))
            await send(message)
        try:
            await self.app(scope, receive, send_when_durable)
        finally:
            _SLOT.reset(token)

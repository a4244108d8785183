"""The bridge's clock: applies what happens with time when no request comes.

Lease expiries, the merge set's report grace and timeout, vote and arbitration deadlines are
transitions of time (`bridge.state.tick`). Requests that change the state apply them first; the
clock applies them every `tick_seconds` as well, so a deadline passes on time in a quiet subnet
and GET routes can be read-only. With several bridge processes each ticks: a tick is a
transition like any other, so whatever it changes happens once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from bridge.state import tick

__all__ = ["ticking"]

log = logging.getLogger(__name__)


async def _tick_forever(svc: Any, every: float) -> None:
    failures = 0
    while True:
        await asyncio.sleep(every)
        try:
            await svc.apply_async(tick)
            failures = 0
        except Exception as exc:  # noqa: BLE001 - the clock must outlive a failed transaction
            failures += 1
            if failures == 1 or failures % 100 == 0:
                log.warning("clock tick failed (%d in a row): %s; retrying every %.1f s",
                            failures, exc, every)


@contextlib.asynccontextmanager
async def ticking(svc: Any, every: float) -> AsyncIterator[None]:
    """Tick `svc` every `every` seconds while the block runs (0: never)."""
    task = asyncio.create_task(_tick_forever(svc, every)) if every > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

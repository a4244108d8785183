"""Long-poll waiters for `POST /v1/hops/lease`: a miner with nothing to do parks here until a
transition gives it (or its stage's pool) work, or the round changes phase, or time runs out.

Single event loop: waiters are registered synchronously right after the lease transition that
answered `wait`, so no wake-up can fall between the check and the wait."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["Waiters"]

log = logging.getLogger(__name__)


class Waiters:
    """Parked lease requests, by miner and by stage."""

    def __init__(self) -> None:
        self._by_miner: dict[str, asyncio.Future] = {}
        self._by_stage: dict[int, dict[str, None]] = {}
        self.woken = 0

    def __len__(self) -> int:
        return len(self._by_miner)

    async def wait(self, hotkey: str, stage: int, timeout: float) -> bool:
        """Park until woken (True) or `timeout` seconds pass (False)."""
        old = self._by_miner.pop(hotkey, None)
        if old is not None and not old.done():
            old.set_result(None)  # a newer poll from the same miner replaces the old one
        fut = asyncio.get_running_loop().create_future()
        self._by_miner[hotkey] = fut
        self._by_stage.setdefault(stage, {})[hotkey] = None
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if self._by_miner.get(hotkey) is fut:
                del self._by_miner[hotkey]
                self._by_stage.get(stage, {}).pop(hotkey, None)

    def _wake_one(self, hotkey: str) -> None:
        fut = self._by_miner.get(hotkey)
        if fut is not None and not fut.done():
            fut.set_result(None)
            self.woken += 1

    def wake(self, targets: dict[tuple[str, Any], Any], everyone: bool = False) -> None:
        """Wake the miners named in `targets` (("miner", hotkey) or ("stage", s)), or all."""
        if everyone:
            for hk in list(self._by_miner):
                self._wake_one(hk)
            return
        for kind, ident in targets:
            if kind == "miner":
                self._wake_one(ident)
            else:  # pool work at a stage: any replica of it may claim it
                for hk in list(self._by_stage.get(ident, ())):
                    self._wake_one(hk)

"""Long-poll waiters for `POST /v1/hops/lease`: a miner with nothing to do parks here until a
transition gives it (or its stage's pool) work, or the round changes phase, or time runs out.

Every wake carries the state version of the commit that made the work, and the waiters
remember the last version that woke each miner, each stage and everyone. A lease answered
`wait` at version v parks only if nothing newer than v woke it in between, so a wake that
arrives before the waiter is registered (another bridge process's NOTIFY, or a batch that
committed while the answer travelled back) is never lost."""
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
        self._woke: dict[tuple[str, Any], int] = {}  # target -> newest version that woke it
        self._woke_all = 0
        self.woken = 0

    def __len__(self) -> int:
        return len(self._by_miner)

    def _missed(self, hotkey: str, stage: int, since: int) -> bool:
        return max(self._woke_all, self._woke.get(("miner", hotkey), 0),
                   self._woke.get(("stage", stage), 0)) > since

    async def wait(self, hotkey: str, stage: int, timeout: float, since: int = 0) -> bool:
        """Park until woken (True) or `timeout` seconds pass (False); returns at once when a
        wake newer than state version `since` already concerned this miner."""
        if since and self._missed(hotkey, stage, since):
            return True
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

    def wake(self, targets: Any, everyone: bool = False, version: int = 0) -> None:
        """Wake the miners named in `targets` (("miner", hotkey) or ("stage", s)), or all;
        `version`: the state version whose commit made the work."""
        if everyone:
            self._woke_all = max(self._woke_all, version)
            for hk in list(self._by_miner):
                self._wake_one(hk)
            return
        for kind, ident in targets:
            key = (kind, ident)
            if version > self._woke.get(key, 0):
                self._woke[key] = version
            if kind == "miner":
                self._wake_one(ident)
            else:  # pool work at a stage: any replica of it may claim it
                for hk in list(self._by_stage.get(ident, ())):
                    self._wake_one(hk)

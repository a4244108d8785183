"""The I/O shell around the state machine: one lock, one SQLite transaction per transition,
presigned URLs, and the side effects (GC) that transitions request."""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable, Optional, TypeVar

from bridge.db import Database
from bridge.records import Hop, State, TransitionError, Tunables
from bridge.storage import Storage
from protocol.messages import RunConfig

__all__ = ["BridgeService"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class BridgeService:
    """Applies transitions atomically: mutate in memory, commit, or reload on failure."""

    def __init__(self, run: RunConfig, db: Database, storage: Optional[Storage],
                 tunables: Tunables = Tunables(), seed: Optional[int] = None,
                 clock: Callable[[], float] = time.time, check_objects: bool = True) -> None:
        self.run, self.db, self.storage, self.tun = run, db, storage, tunables
        self.clock = clock
        self.rng = random.Random(seed)
        self.check_objects = check_objects and storage is not None
        self.lock = threading.Lock()
        self.state: State = db.load(run, tunables)

    def apply(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(state, *args, now, rng)` as one transition: applied once or not at all."""
        with self.lock:
            st = self.state
            st.dirty, st.events = {}, []
            try:
                out = fn(st, *args, self.clock(), self.rng)
                if st.dirty:
                    self.db.commit(st, st.dirty)
            except TransitionError:
                if st.dirty:  # refused after a time tick changed things: keep those
                    self.db.commit(st, st.dirty)
                raise
            except BaseException:
                log.exception("transition %s failed; reloading state from the database",
                              getattr(fn, "__name__", fn))
                self.state = self.db.load(self.run, self.tun)
                raise
            events = st.events
        self._effects(events)
        return out

    def read(self, fn: Callable[[State], T]) -> T:
        """Run a read-only function over the state under the lock."""
        with self.lock:
            return fn(self.state)

    def _effects(self, events: list[tuple[str, Any]]) -> None:
        for kind, arg in events:
            if kind == "round_start":
                self._gc(int(arg))

    def _gc(self, round_: int) -> None:
        old = round_ - self.run.audit_window_rounds - 1
        if old < 0 or self.storage is None:
            return
        keep = {s.key for s in self.state.stage_states if s.key}
        try:
            for r in range(max(0, old - 2), old + 1):
                n = self.storage.delete_prefix(f"runs/{self.run.run_id}/r{r}/", keep=keep)
                if n:
                    log.info("gc: deleted %d objects of round %d", n, r)
        except Exception:  # GC is best effort; the next round start tries again
            log.exception("gc of round %d failed", old)

    # ---- URL helpers ---------------------------------------------------------------------
    def get_url(self, key: str, expires: float) -> str:
        """Presigned GET (or a plain reference when no storage is configured)."""
        if self.storage is None:
            return f"s3://{key}"
        return self.storage.presign_get(key, int(expires))

    def put_url(self, key: str, size: int, expires: float) -> str:
        """Presigned PUT for exactly `size` bytes."""
        if self.storage is None:
            return f"s3://{key}"
        return self.storage.presign_put(key, size, int(expires))

    def object_size(self, key: str) -> Optional[int]:
        """HEAD an object (skipped, trusting the caller, when object checks are off)."""
        if not self.check_objects:
            return -1
        return self.storage.head(key)

    def hop_deadline_expiry(self, hop: Hop) -> float:
        """Seconds from now until the hop's lease deadline (for URL expiry)."""
        return max(1.0, hop.deadline - self.clock())

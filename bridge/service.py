"""The I/O shell around the state machine: one lock, SQLite transactions (one per transition,
or one per event-loop batch of transitions), presigned URLs, and the side effects (GC, waking
long-polls) that transitions request."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Any, Callable, Optional, TypeVar

from bridge.db import Database
from bridge.records import Hop, State, TransitionError, Tunables
from bridge.storage import Storage, StorageError
from protocol.messages import RunConfig

__all__ = ["BridgeService"]

log = logging.getLogger(__name__)
T = TypeVar("T")
SLOW_COMMIT_S = 0.1  # a group commit slower than this is logged: every caller waits on it


class BridgeService:
    """Applies transitions atomically: mutate in memory, commit, or reload on failure.

    `apply` commits each transition on its own. `apply_async` (the API path) lets every
    transition made in one event-loop iteration share a single commit, together with the
    nonces of the requests that made them, and returns only once that commit is done: no
    caller is answered before its change is on disk."""

    def __init__(self, run: RunConfig, db: Database, storage: Optional[Storage],
                 tunables: Tunables = Tunables(), seed: Optional[int] = None,
                 clock: Callable[[], float] = time.time, check_objects: bool = True,
                 nonces: Any = None,
                 on_wake: Optional[Callable[[dict, bool], None]] = None) -> None:
        self.run, self.db, self.storage, self.tun = run, db, storage, tunables
        self.clock = clock
        self.rng = random.Random(seed)
        self.check_objects = check_objects and storage is not None
        self.lock = threading.Lock()
        self.state: State = db.load(run, tunables)
        self.nonces = nonces    # a store with flush(), committed with each batch (or None)
        self.on_wake = on_wake  # told which long-polls a transition woke (or None)
        self.commits = 0
        self.listeners: list[Callable[[str, Any], None]] = []  # told every event after its commit
        self._pending: dict = {}
        self._flush_fut: Optional[asyncio.Future] = None

    def _run(self, fn: Callable[..., T], args: tuple) -> tuple[Any, Optional[TransitionError]]:
        """Run one transition on the live state (lock held): (result, refusal or None)."""
        st = self.state
        st.dirty, st.events = {}, []
        st.wake, st.wake_all = {}, False
        before = (st.phase, st.round)
        try:
            return fn(st, *args, self.clock(), self.rng), None
        except TransitionError as exc:
            return None, exc  # refused; what a time tick changed before the refusal is kept
        finally:
            st.wake_all = (st.phase, st.round) != before

    def apply(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(state, *args, now, rng)` as one transition: applied once or not at all."""
        with self.lock:
            try:
                out, err = self._run(fn, args)
                self._commit_now()
            except BaseException:
                log.exception("transition %s failed; reloading state from the database",
                              getattr(fn, "__name__", fn))
                self.state = self.db.load(self.run, self.tun)
                raise
            st = self.state
            events, wake, wake_all = st.events, st.wake, st.wake_all
        self._effects(events, wake, wake_all)
        if err is not None:
            raise err
        return out

    def _commit_now(self) -> None:
        st = self.state
        dirty = {**self._pending, **st.dirty} if self._pending else st.dirty
        self._pending = {}
        if self.db.commit(st, dirty):  # the global fields may have changed with no record
            self.commits += 1

    async def apply_async(self, fn: Callable[..., T], *args: Any) -> T:
        """`apply` whose commit is shared by this loop iteration's transitions; call on the loop."""
        with self.lock:
            try:
                out, err = self._run(fn, args)
            except BaseException:
                log.exception("transition %s failed; reloading state from the database",
                              getattr(fn, "__name__", fn))
                self._abort_batch()
                raise
            st = self.state
            self._pending.update(st.dirty)
            events, wake, wake_all = st.events, st.wake, st.wake_all
        await asyncio.shield(self._batch())  # the commit diffs the globals: always join it
        self._effects(events, wake, wake_all)
        if err is not None:
            raise err
        return out

    async def nonces_durable(self, seq: int) -> None:
        """Return once the nonce store has persisted its first `seq` nonces (a group commit)."""
        for _ in range(3):
            if self.nonces is None or self.nonces.durable >= seq:
                return
            await asyncio.shield(self._batch())
        raise RuntimeError(f"nonce {seq} still not persisted after three group commits")

    def _batch(self) -> asyncio.Future:
        if self._flush_fut is None:
            loop = asyncio.get_running_loop()
            self._flush_fut = loop.create_future()
            loop.call_soon(self._flush)
        return self._flush_fut

    def _flush(self) -> None:
        fut, self._flush_fut = self._flush_fut, None
        t0, n = time.perf_counter(), len(self._pending)
        try:
            with self.lock:
                if self.nonces is not None:
                    self.nonces.flush()
                self._commit_now()
            dt = time.perf_counter() - t0
            if dt > SLOW_COMMIT_S:
                log.warning("slow group commit: %d records in %.0f ms", n, dt * 1000)
        except BaseException as exc:
            log.exception("group commit failed; reloading state from the database")
            with self.lock:
                self._pending = {}
                self.state = self.db.load(self.run, self.tun)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            return
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _abort_batch(self) -> None:
        """A transition crashed mid-way: drop the uncommitted batch, fail its waiters, reload."""
        self._pending = {}
        self.state = self.db.load(self.run, self.tun)
        fut, self._flush_fut = self._flush_fut, None
        if fut is not None and not fut.done():
            fut.set_exception(RuntimeError("batch aborted: a transition failed; retry"))

    def read(self, fn: Callable[[State], T]) -> T:
        """Run a read-only function over the state under the lock."""
        with self.lock:
            return fn(self.state)

    def _effects(self, events: list[tuple[str, Any]], wake: Optional[dict] = None,
                 wake_all: bool = False) -> None:
        if self.on_wake is not None and (wake or wake_all):
            self.on_wake(wake or {}, wake_all)
        for kind, arg in events:
            if kind == "round_start":
                self._gc(int(arg))
            for listener in self.listeners:
                listener(kind, arg)

    def _gc(self, round_: int) -> None:
        old = round_ - self.run.audit_window_rounds - 1
        if old < 0 or self.storage is None:
            return
        keep = {k for s in self.state.stage_states for k in [s.key, *s.alt_keys] if k}
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

    def promote(self, src: str, dst: str, size: int) -> None:
        """Copy a reported upload to its final, grant-less key (skipped when checks are off)."""
        if self.check_objects and self.storage is not None and not self.storage.copy(src, dst, size):
            raise StorageError(f"COPY {src} -> {dst}: no object at {src}")

    def object_size(self, key: str) -> Optional[int]:
        """HEAD an object (skipped, trusting the caller, when object checks are off)."""
        if not self.check_objects:
            return -1
        return self.storage.head(key)

    def hop_deadline_expiry(self, hop: Hop) -> float:
        """Seconds from now until the hop's lease deadline (for URL expiry)."""
        return max(1.0, hop.deadline - self.clock())

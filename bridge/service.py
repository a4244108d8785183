"""The I/O shell around the state machine: transactions of transitions (one per `apply`, or one
per event-loop batch of `apply_async` calls), presigned URLs, and the side effects (GC, waking
long-polls) that transitions request.

A batch is one database transaction (`bridge.db`): the backend brings the live state up to what
is committed (with PostgreSQL, under the run's lock and with what other bridge processes
wrote), the nonces of the batch's requests are settled in it, the transitions run in the order
they were asked for, and what they changed is written and committed before any caller is
answered. With SQLite the batch runs on the event loop; with PostgreSQL on a worker thread,
so that the loop keeps parsing and verifying requests while the database works."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar

from bridge.durable import current_nonce
from bridge.records import Hop, State, TransitionError, Tunables
from bridge.storage import Storage, StorageError
from protocol.keys import round_prefix, sync_round_prefix
from protocol.messages import RunConfig

__all__ = ["BridgeService", "seen_version"]

log = logging.getLogger(__name__)
T = TypeVar("T")
SLOW_COMMIT_S = 0.1  # a group commit slower than this is logged: every caller waits on it
_SEEN: contextvars.ContextVar[int] = contextvars.ContextVar("state_version", default=0)


def seen_version() -> int:
    """The state version the current request's last transition ran at (for long-polls)."""
    return _SEEN.get()


class _Item:
    """One transition asked for (fn None: only wait for the request's nonce to be settled)."""

    __slots__ = ("fn", "args", "seq", "fut", "out", "err", "events", "wake", "wake_all",
                 "version")

    def __init__(self, fn: Optional[Callable[..., Any]], args: tuple, seq: int = 0) -> None:
        self.fn, self.args, self.seq = fn, args, seq
        self.fut: Optional[asyncio.Future] = None
        self.out: Any = None
        self.err: Optional[Exception] = None
        self.events: list = []
        self.wake: dict = {}
        self.wake_all = False
        self.version = 0


class BridgeService:
    """Applies transitions atomically: in one database transaction, or not at all (then the
    live state is reloaded).

    `apply` commits each transition on its own. `apply_async` (the API path) lets every
    transition asked for in one event-loop iteration share a single transaction, together with
    the nonces of the requests that made them, and returns only once that commit is done: no
    caller is answered before its change is durable."""

    def __init__(self, run: RunConfig, db: Any, storage: Optional[Storage],
                 tunables: Tunables = Tunables(), seed: Optional[int] = None,
                 clock: Callable[[], float] = time.time, check_objects: bool = True,
                 nonces: Any = None,
                 on_wake: Optional[Callable[[dict, bool, int], None]] = None) -> None:
        self.run, self.db, self.storage, self.tun = run, db, storage, tunables
        self.clock = clock
        self.rng = random.Random(seed)
        self.check_objects = check_objects and storage is not None
        self.lock = threading.Lock()        # the live state
        self._one_tx = threading.Lock()     # one transaction at a time in this process
        self.state: State = db.load(run, tunables)
        self.nonces = nonces    # settled in each batch's transaction (or None)
        self.on_wake = on_wake  # told which long-polls a transition woke (or None)
        self.commits = 0
        self._queue: list[_Item] = []
        self._drainer: Optional[asyncio.Task] = None
        self._worker = ThreadPoolExecutor(1, "bridge-tx") if db.blocking else None
        self._uncommitted = False  # the live state holds changes not committed yet
        self._stale = False        # a failed commit left changes in memory: reload first
        self._slow, self._slow_logged = 0, -1e9
        self.listeners: list[Callable[[str, Any], None]] = []  # told every event after its commit

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

    def _transact(self, items: list[_Item]) -> None:
        """Run `items` as one database transaction (any thread); raises when it failed, and
        then nothing of it is applied."""
        with self._one_tx:
            t0 = time.perf_counter()
            tx = self.db.begin(reload=self._stale) if self.db.shared else self.db.begin()
            try:
                verdicts = self.nonces.settle(tx) if self.nonces is not None else {}
                with self.lock:
                    self.state = tx.fold(self.state)
                    self._stale = False
                    dirty: dict = {}
                    wake: dict = {}
                    wake_all = False
                    for it in items:
                        refusal = verdicts.get(it.seq) if it.seq else None
                        if refusal is not None:
                            it.err = refusal
                            continue
                        if it.fn is None:
                            continue
                        it.out, it.err = self._run(it.fn, it.args)
                        st = self.state
                        dirty.update(st.dirty)
                        it.events, it.wake, it.wake_all = st.events, st.wake, st.wake_all
                        wake.update(st.wake)
                        wake_all = wake_all or st.wake_all
                    self._uncommitted = True
                woke = {"targets": list(wake), "all": wake_all} if wake or wake_all else None
                if tx.commit(self.state, dirty, woke):  # the globals may change with no record
                    self.commits += 1
            except BaseException:
                log.exception("transaction of %d transition(s) failed; reloading the state",
                              len(items))
                tx.rollback()
                if self.nonces is not None:
                    self.nonces.settled(False)
                with self.lock:
                    self._uncommitted = False
                    self._reload()
                raise
            if self.nonces is not None:
                self.nonces.settled(True)
            with self.lock:
                self._uncommitted = False
            for it in items:
                it.version = tx.version
            self._note_time(time.perf_counter() - t0, len(items))

    def _note_time(self, dt: float, n: int) -> None:
        """Log slow transactions: each on its own, then at most one summary line per 10 s."""
        if dt <= SLOW_COMMIT_S:
            return
        self._slow += 1
        now = time.monotonic()
        if now - self._slow_logged >= 10.0:
            log.warning("slow transaction: %d transitions in %.0f ms (%d slower than %.0f ms "
                        "since the last such line)", n, dt * 1000, self._slow,
                        SLOW_COMMIT_S * 1000)
            self._slow, self._slow_logged = 0, now

    def _reload(self) -> None:
        """Drop what is in memory for what is committed (lock held); when the database cannot
        be read now, the next transaction reloads first."""
        try:
            self.state = self.db.load(self.run, self.tun)
        except Exception:  # noqa: BLE001 - the next transaction retries the reload
            log.exception("reloading the state failed; the next transaction reloads first")
            self._stale = True

    def apply(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(state, *args, now, rng)` as one transition: applied once or not at all."""
        it = _Item(fn, args)
        self._transact([it])
        self._effects(it)
        if it.err is not None:
            raise it.err
        return it.out

    async def apply_async(self, fn: Callable[..., T], *args: Any) -> T:
        """`apply` whose transaction is shared by this loop iteration's transitions; call on
        the loop. A request refused when its nonce was settled is not applied (the refusal is
        raised instead)."""
        it = _Item(fn, args, current_nonce())
        await self._submit(it)
        self._effects(it)
        _SEEN.set(it.version)
        if it.err is not None:
            raise it.err
        return it.out

    async def nonces_durable(self, seq: int) -> None:
        """Return once the nonce store has settled its first `seq` nonces (a group commit);
        raises the refusal when the database refused nonce `seq` (replay, rate)."""
        for _ in range(3):
            if self.nonces is None:
                return
            if self.nonces.durable >= seq:
                break
            await self._submit(_Item(None, (), seq))
        else:
            raise RuntimeError(f"nonce {seq} still not persisted after three group commits")
        refusal = self.nonces.verdict(seq)
        if refusal is not None:
            raise refusal

    async def _submit(self, it: _Item) -> None:
        loop = asyncio.get_running_loop()
        it.fut = loop.create_future()
        self._queue.append(it)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        await asyncio.shield(it.fut)

    async def _drain(self) -> None:
        """Run queued transitions, a batch per transaction, until none are left."""
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                items, self._queue = self._queue, []
                try:
                    if self._worker is not None:
                        await loop.run_in_executor(self._worker, self._transact, items)
                    else:
                        self._transact(items)
                except BaseException as exc:  # noqa: BLE001 - every waiter hears of it
                    err = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                    for it in items:
                        if not it.fut.done():
                            it.fut.set_exception(err)
                    continue
                for it in items:
                    if not it.fut.done():
                        it.fut.set_result(None)
        finally:
            self._drainer = None

    def read(self, fn: Callable[[State], T]) -> T:
        """Run a read-only function over the state under the lock; with a shared database, over
        the state brought up to what every process committed (a failed catch-up is logged and
        the live state read)."""
        if not self.db.shared:
            with self.lock:
                return fn(self.state)
        seen, got = self.db.version, None
        try:
            got = self.db.changes(seen)  # the round trip without the lock: transactions go on
        except Exception as exc:  # noqa: BLE001 - serve what we have; writes are safe
            log.warning("catching up with the database failed (%s); answering from this "
                        "process's state", exc)
        with self.lock:
            try:
                if self._stale:
                    self.state, self._stale = self.db.load(self.run, self.tun), False
                elif got is not None and not self._uncommitted:
                    self.state = self.db.fold_changes(self.state, seen, got)
            except Exception as exc:  # noqa: BLE001
                log.warning("catching up with the database failed (%s); answering from this "
                            "process's state", exc)
            return fn(self.state)

    def check(self, fn: Callable[[State], T]) -> T:
        """A pre-check before slow work (a hop's seal): `fn` over the live state as it is, and
        only when it refuses (TransitionError) over the state brought up to date, so the common
        case costs no database round trip. The transition that follows decides for certain."""
        if self.db.shared:
            try:
                with self.lock:
                    return fn(self.state)
            except TransitionError:
                pass  # maybe only stale: another process changed it; look again
        return self.read(fn)

    def _effects(self, it: _Item) -> None:
        if self.on_wake is not None and (it.wake or it.wake_all):
            self.on_wake(it.wake, it.wake_all, it.version)
        for kind, arg in it.events:
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
            # a round still in the audit window may start from an older state (a sharded run's
            # checkpoint every K rounds, a stage that kept its state): audits rebuild from it
            for r in range(old + 1, round_ + 1):
                for d in (self.db.round_archive(r) or {}).get("states", []):
                    keep.update(k for k in [d.get("key"), *d.get("alt_keys", [])] if k)
            for r in range(max(0, old - 2), old + 1):
                n = self.storage.delete_prefix(round_prefix(self.run.run_id, r), keep=keep)
                if n:
                    log.info("gc: deleted %d objects of round %d", n, r)
            if self.run.sharded:
                self._gc_sync(old)
        except Exception:  # GC is best effort; the next round start tries again
            log.exception("gc of round %d failed", old)

    GC_SYNC_ROUNDS = 64  # sync/ rounds deleted per round start at most (one LIST each)

    def _gc_sync(self, old: int) -> None:
        """Delete the merged updates (`runs/{run}/sync/r{r}/`) of rounds up to `old` that no kept
        update log names any more (a checkpoint superseded them), from where the last GC stopped."""
        def bounds(st: State) -> tuple[int, int]:
            logged = [int(r) for log_ in st.sync.get("updates", {}).values() for r in log_]
            return int(st.sync.get("gc_from", 0)), min(old + 1, min(logged, default=st.round))
        start, end = self.read(bounds)
        end = min(end, start + self.GC_SYNC_ROUNDS)
        if end <= start:
            return
        for r in range(start, end):
            n = self.storage.delete_prefix(sync_round_prefix(self.run.run_id, r))
            if n:
                log.info("gc: deleted %d merged-update objects of round %d", n, r)
        with self.lock:  # part of the meta row: the next commit persists it
            self.state.sync["gc_from"] = max(int(self.state.sync.get("gc_from", 0)), end)

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

    def drop(self, keys: list[str]) -> None:
        """Delete objects the bridge copied for a request it then refused (best effort)."""
        if not keys or not self.check_objects or self.storage is None:
            return
        try:
            self.storage.delete(keys)
        except Exception:  # a leftover copy is unreferenced: GC of its round removes it
            log.exception("could not delete %d refused object(s)", len(keys))

    def object_size(self, key: str) -> Optional[int]:
        """HEAD an object (skipped, trusting the caller, when object checks are off)."""
        if not self.check_objects:
            return -1
        return self.storage.head(key)

    def hop_deadline_expiry(self, hop: Hop) -> float:
        """Seconds from now until the hop's lease deadline (for URL expiry)."""
        return max(1.0, hop.deadline - self.clock())

"""Wake-ups across bridge processes: the commit that creates work NOTIFYs the run's channel
(`bridge.db_postgres`); every process LISTENs on its own connection and wakes its parked
long-polls (`bridge.longpoll`) for what other processes made. A lost connection is retried
every second, and after reconnecting everyone is woken once (what came meanwhile is unknown)."""
from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

__all__ = ["WakeListener"]

log = logging.getLogger(__name__)


class WakeListener(threading.Thread):
    """LISTEN on `channel`; `deliver(targets, everyone, version)` for other processes' NOTIFYs."""

    def __init__(self, url: str, channel: str, origin: str,
                 deliver: Callable[[list, bool, int], None]) -> None:
        super().__init__(daemon=True, name="pg-listen")
        self.url, self.channel, self.origin, self.deliver = url, channel, origin, deliver
        self.ready = threading.Event()  # set once LISTEN is in place
        self.received = 0
        self._stop = threading.Event()
        self._conn: Any = None

    def run(self) -> None:
        import psycopg
        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    self._conn = conn
                    conn.execute(f"LISTEN {self.channel}")
                    self.ready.set()
                    if not first:
                        self.deliver([], True, 0)  # missed while disconnected: wake everyone
                    first = False
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._handle(note.payload)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                log.warning("LISTEN %s lost (%s); reconnecting in 1 s", self.channel, exc)
                self._stop.wait(1.0)

    def _handle(self, payload: str) -> None:
        try:
            body = json.loads(payload)
            if body.get("o") == self.origin:
                return  # our own commit: woken locally already
            targets = [(str(k), i) for k, i in body.get("t", ())]
            self.received += 1
            self.deliver(targets, bool(body.get("a")), int(body.get("v", 0)))
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring a malformed NOTIFY on %s: %s", self.channel, exc)

    def stop(self) -> None:
        """Stop listening (returns within about a second)."""
        self._stop.set()

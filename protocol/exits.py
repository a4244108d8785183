"""Exit codes and one-line messages for misconfiguration, shared by every entry point.

A process that cannot start prints one line, `error: <what is wrong>; <what to do>`, and exits
with a code from `Exit` (documented in docs/CONTRACTS.md), never a traceback. Transient faults
(bridge or S3 not answering yet) are retried with back-off by `retry`, which logs each wait.
"""
from __future__ import annotations

import enum
import functools
import logging
import sys
import time
from typing import Any, Callable, Optional, TypeVar

__all__ = ["Exit", "Misconfigured", "Transient", "exits_cleanly", "retry", "backoff_delays"]

T = TypeVar("T")


class Exit(enum.IntEnum):
    """Process exit codes; each bad configuration has its own."""

    OK = 0
    USAGE = 2                 # a flag or variable has a bad value (argparse uses 2 too)
    CONFIG_FILE = 3           # run-config or --env-file missing or invalid
    WALLET = 4                # wallet or hotkey file missing or unreadable
    NETWORK_NAME = 5          # --subtensor.network is not a known network
    CHAIN_UNREACHABLE = 6     # no chain node answers at the endpoint
    LOCALCHAIN_MISSING = 7    # localchain:PATH names no file
    NETUID = 8                # the subnet does not exist on that chain
    NOT_REGISTERED = 9        # the hotkey is not registered on the subnet
    NO_PERMIT = 10            # a validator without a validator permit
    BRIDGE_UNREACHABLE = 11   # nothing answers at --bridge.url (after retries)
    NOT_A_BRIDGE = 12         # something answers at --bridge.url, but not a bridge
    S3_UNREACHABLE = 13       # the S3 endpoint does not answer (after retries)
    S3_CREDENTIALS = 14       # S3 rejects the access key or secret
    DEVICE = 15               # --device names a device this machine lacks
    BRIDGE_MISMATCH = 16      # the bridge serves another netuid or chain than the neuron's
    NO_NETNS = 17             # kernel links asked for, but network namespaces cannot be made here
    DATABASE = 18             # the bridge's --db cannot be opened (PostgreSQL down, refused, no driver)
    MODEL_UNAVAILABLE = 19    # no verifiable published model for the round asked (resbm-export)


class Misconfigured(Exception):
    """A configuration mistake: `message` says what is wrong and what to do; `code` is its exit."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code, self.message = Exit(code), message


class Transient(Exception):
    """A fault worth retrying (a server not answering yet); `final` is raised when retries run out."""

    def __init__(self, message: str, final: Misconfigured) -> None:
        super().__init__(message)
        self.final = final


def backoff_delays(first: float, cap: float, total: float) -> list[float]:
    """Doubling waits from `first` up to `cap` each, summing to at most `total` seconds."""
    delays, spent, d = [], 0.0, first
    while first > 0 and spent + d <= total:
        delays.append(d)
        spent += d
        d = min(cap, d * 2)
    return delays


def retry(what: str, fn: Callable[[], T], log: logging.Logger, give_up_after: float,
          first: float = 1.0, cap: float = 30.0) -> T:
    """Call `fn`; on `Transient`, log and wait (doubling back-off) up to `give_up_after` seconds,
    then raise the fault's final `Misconfigured`."""
    for delay in backoff_delays(first, cap, give_up_after) + [None]:
        try:
            return fn()
        except Transient as exc:
            if delay is None:
                raise exc.final from None
            log.warning("%s: %s; retrying in %.0fs (gives up after %.0fs)", what, exc, delay,
                        give_up_after)
            time.sleep(delay)
    raise AssertionError("unreachable")


def exits_cleanly(main: Callable[..., Optional[int]]) -> Callable[..., int]:
    """Wrap an entry point: `Misconfigured` becomes one stderr line and its exit code; Ctrl-C
    during start-up exits 130 without a traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except Misconfigured as exc:
            print(f"error: {exc.message}", file=sys.stderr, flush=True)
            return int(exc.code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper

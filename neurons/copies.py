"""Reading a decided object from any of its copies: every agreeing voter (or merger) holds the same
bytes under its own key, so one bad, missing or slow copy never blocks a reader."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from neurons.transfer import TransferError
from resbm.outer import OuterError

__all__ = ["first_good_copy"]

T = TypeVar("T")


def first_good_copy(urls: Sequence[str], read: Callable[[str], T], what: str) -> T:
    """`read(url)` of the first copy that downloads, matches its sha256 and decodes (`read` raises
    TransferError or OuterError for one that does not). When none does: a TransferError naming
    `what` and the last failure, with that failure's status and the failure itself as its cause."""
    last: Exception | None = None
    for url in urls:
        try:
            return read(url)
        except (TransferError, OuterError) as exc:
            last = exc
    raise TransferError(f"{what}: no copy of {len(urls)} is readable ({last})",
                        getattr(last, "status", None)) from last

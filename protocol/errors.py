"""Error codes of the bridge API and the one table that maps each to its HTTP status.

The bridge's state machine refuses a call with a code and a message only; the web layer answers
with `http_status(code)`. Clients may use the same table (say, to tell a retryable refusal from
bad input by its code). A code missing from the table is a bug: it answers 500.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["ERROR_STATUS", "RETRY_AFTER_STATUS", "http_status", "retry_after"]

_BY_STATUS: dict[int, tuple[str, ...]] = {
    400: ("bad_key", "bad_request", "bad_shard", "bad_shards", "bad_size", "bad_tokens", "bad_version",
          "missing_object", "oversized"),
    404: ("no_dataset", "unknown_file", "unknown_hop", "unknown_hotkey", "unknown_stage"),
    409: ("already_reported", "already_voted", "expired", "frozen", "future_round", "in_progress",
          "no_dispute", "no_work", "not_a_merger", "not_decided", "not_frozen",
          "not_in_merge_set", "not_leased", "not_merging", "not_registered", "not_yours",
          "open_work", "quarantined", "stale_round", "wrong_round", "wrong_samples",
          "wrong_step",
          "moved_on", "not_checkpoint", "not_kept", "not_sharded", "sharded_run",
          "updates_pruned",  # the sharded sync
          "kept_state", "not_published"),  # the published model (GET /v1/model)
    413: ("body_too_large",),
    429: ("rate_limited",),
    503: ("storage_error",),
}

ERROR_STATUS: dict[str, int] = {code: status for status, codes in _BY_STATUS.items()
                                for code in codes}
RETRY_AFTER_STATUS = (409, 429)  # refusals that may succeed later: the body says when to retry


def http_status(code: str) -> int:
    """The HTTP status the bridge answers a refusal `code` with (500 for an unknown code)."""
    return ERROR_STATUS.get(code, 500)


def retry_after(code: str) -> Optional[float]:
    """Seconds a client should wait before retrying a refusal `code` (None: do not retry)."""
    return 1.0 if http_status(code) in RETRY_AFTER_STATUS else None

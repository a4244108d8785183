"""Why an audit ended incomplete, in words an operator can act on."""
from __future__ import annotations

import re

__all__ = ["explain_incomplete"]

_GONE = re.compile(r"\b(404|NoSuchKey|Not Found)\b")


def explain_incomplete(reason: str, audited_round: int, newest_round: int, window: int) -> str:
    """`reason`, plus the cause when objects are gone: the bridge deletes a round's objects
    `window` (RunConfig.audit_window_rounds) rounds later, so a validator that far behind
    finds them missing."""
    if not _GONE.search(reason):
        return reason
    behind = newest_round - audited_round
    if behind >= window:
        return (f"{reason} (the round's objects left the audit window: the bridge keeps "
                f"{window} rounds of objects and this validator is {behind} rounds behind; give it "
                "a faster device or a smaller --audit.fraction so it keeps up)")
    return (f"{reason} (an object the hop log names is missing from S3 although round "
            f"{audited_round} is inside the {window}-round audit window)")

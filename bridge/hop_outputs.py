"""The object-store side of hop outputs (blocking I/O; the API runs these in a thread).

`seal` copies a producer's upload to the hop's sealed key at `done`, server-side: no presigned
URL is ever issued for a sealed key, so what consumers and validators read cannot change after
`done`. `look_at` fetches a sealed input (a few KB) to judge a consumer's claim about it."""
from __future__ import annotations

from typing import Optional

from bridge.claims import Verdict
from bridge.codespec import CodeSpec, judge_bytes
from bridge.records import ObjRef, TransitionError
from protocol.keys import staging_of
from bridge.storage import Storage

__all__ = ["seal", "look_at"]


def seal(storage: Optional[Storage], out_key: str) -> None:
    """Copy the upload of `out_key` to `out_key`; 400 `missing_object` when nothing was uploaded.
    Without a store (benchmarks) there is nothing to seal."""
    if storage is None:
        return
    src = staging_of(out_key)
    if not storage.copy(src, out_key):
        raise TransitionError("missing_object", f"no object at {src}: upload the output "
                              "with the lease's put_url before reporting done")


def look_at(storage: Optional[Storage], spec: Optional[CodeSpec], ref: ObjRef) -> Verdict:
    """The bridge's verdict on one sealed input object."""
    if storage is None or spec is None:
        return ref, "unchecked", "no object store to check against"
    verdict, detail = judge_bytes(storage.get(ref.key, spec.nbytes), ref.sha256, spec)
    return ref, verdict, detail

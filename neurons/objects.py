"""Verified downloads of every object a neuron reads, and the encoding of what it uploads.

The one place miners (hops, merges) and validators (audits, merge checks) fetch objects: hop
codes and gradients here; the sync's pieces, merged updates and checkpoints through
`fetch_any_copy` (any agreeing voter's copy). Every byte from the network is checked against the
sha256 the bridge recorded and decoded against the run's shapes (size, shape, dtype and
finiteness) before compute sees it; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from protocol.messages import FailReason, Hop, ObjectRef
from resbm import codec, outer
from neurons.hop_exec import needs_activation, needs_gradient
from neurons.transfer import HashMismatch, ObjectTransfer, TransferError

__all__ = ["BadInput", "HopInputs", "fetch_code", "fetch_inputs", "encode_output", "fail_reason",
           "fetch_any_copy"]

T = TypeVar("T")


class BadInput(Exception):
    """An input object was missing or failed decoding; `reason` is the bridge's FailReason."""

    def __init__(self, reason: FailReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class HopInputs:
    """Decoded inputs of one hop (None where the hop has no such input)."""

    act: torch.Tensor | None
    grad: torch.Tensor | None


def fail_reason(exc: Exception) -> FailReason:
    """Map a codec or transfer error onto the reason the bridge records."""
    if isinstance(exc, (codec.HashMismatch, HashMismatch)):
        return "bad_hash"
    if isinstance(exc, codec.NonFinite):
        return "nonfinite"
    if isinstance(exc, codec.CodecError):
        return "bad_shape"
    if isinstance(exc, TransferError) and exc.status in (403, 404):
        return "missing"
    return "other"


def fetch_code(transfer: ObjectTransfer, ref: ObjectRef, shape: tuple[int, ...], wire_codec: str) -> torch.Tensor:
    """Download one code or gradient, check its recorded sha256 and decode it; raises BadInput."""
    limit = codec.wire_size(shape, wire_codec)
    try:
        data = transfer.get_verified(ref.url, ref.sha256, max_bytes=limit, what=ref.key)
        return codec.decode(data, shape, wire_codec, max_bytes=limit)
    except (TransferError, codec.CodecError) as exc:
        raise BadInput(fail_reason(exc), f"{ref.key}: {exc}") from exc


def fetch_inputs(transfer: ObjectTransfer, hop: Hop, shape: tuple[int, ...], wire_codec: str) -> HopInputs:
    """Download and decode what `hop` (a leased Hop or a logged HopRecord) needs; raises BadInput
    naming the object and the problem."""
    act = grad = None
    if needs_activation(hop.kind, hop.recompute) and hop.stage > 0:
        if hop.act_in is None:
            raise BadInput("missing", f"hop {hop.hop_id} has no activation input")
        act = fetch_code(transfer, hop.act_in, shape, wire_codec)
    if needs_gradient(hop.kind):
        if hop.grad_in is None:
            raise BadInput("missing", f"hop {hop.hop_id} has no gradient input")
        grad = fetch_code(transfer, hop.grad_in, shape, wire_codec)
    return HopInputs(act=act, grad=grad)


def encode_output(t: torch.Tensor, wire_codec: str) -> tuple[bytes, str]:
    """Encoded bytes of an output tensor and their sha256."""
    data = codec.encode(t, wire_codec)
    return data, hashlib.sha256(data).hexdigest()


def fetch_any_copy(transfer: ObjectTransfer, urls: Sequence[str], sha256: str, max_bytes: int, what: str,
                   decode: Callable[[bytes], T]) -> T:
    """`decode(bytes)` of the first of `urls` (copies of one object, one per agreeing voter) that
    downloads, matches `sha256` and decodes: one voter's bad or missing copy never blocks a
    reader. TransferError when none does."""
    last: Exception | None = None
    for url in urls:
        try:
            return decode(transfer.get_verified(url, sha256, max_bytes, what))
        except (TransferError, outer.OuterError) as exc:
            last = exc
    raise TransferError(f"{what}: no copy of {len(urls)} is readable ({last})")

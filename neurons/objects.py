"""Verified downloads of every object a neuron reads, and the encoding of what it uploads.

The one place miners (hops, merges) and validators (audits, merge checks) fetch objects: hop
codes and gradients, published stage states, pseudo-gradients. Every byte from the network is
checked against the sha256 the bridge recorded and decoded against the run's shapes (size,
shape, dtype and finiteness) before compute sees it; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from protocol.messages import FailReason, Hop, MergeItem, ObjectRef, StateRef
from resbm import codec, outer
from neurons.copies import first_good_copy
from neurons.hop_exec import needs_activation, needs_gradient
from neurons.transfer import HashMismatch, ObjectTransfer, TransferError

__all__ = ["BadInput", "HopInputs", "fetch_code", "fetch_inputs", "encode_output", "fail_reason",
           "fetch_state", "fetch_tensors", "fetch_items"]

Tensors = dict[str, torch.Tensor]


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


def fetch_state(transfer: ObjectTransfer, ref: StateRef, shapes: dict, max_bytes: int) -> outer.OuterState:
    """Download a published state (from any agreeing voter's copy); check sha, names, shapes."""
    def read(url: str) -> outer.OuterState:
        blob = transfer.get_verified(url, ref.sha256, max_bytes, what=f"state {ref.key}")
        return outer.load_state(blob, expected=shapes, max_bytes=max_bytes)
    return first_good_copy([ref.url, *ref.alt_urls], read, f"state {ref.key}")


def fetch_tensors(transfer: ObjectTransfer, url: str, sha256: str, shapes: dict, max_bytes: int,
                  what: str) -> Tensors:
    """Download named tensors (a pseudo-gradient); raises TransferError / HashMismatch or OuterError."""
    blob = transfer.get_verified(url, sha256, max_bytes, what)
    return outer.tensors_from_bytes(blob, shapes, max_bytes=max_bytes)


def fetch_items(transfer: ObjectTransfer, items: list[MergeItem], shapes: dict,
                max_bytes: int) -> list[tuple[int, Tensors | None, str]]:
    """(verified samples, tensors or None, why None) per merge item, in the set's order."""
    out = []
    for it in items:
        try:
            tensors = fetch_tensors(transfer, it.get_url, it.sha256, shapes, max_bytes,
                                    f"pseudo-gradient of {it.hotkey}")
            out.append((it.samples, tensors, ""))
        except HashMismatch as exc:
            out.append((it.samples, None, f"hash mismatch: {exc}"[:300]))
        except outer.OuterError as exc:
            out.append((it.samples, None, f"undecodable: {exc}"[:300]))
    return out

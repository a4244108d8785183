"""Turning leased hops into tensors and back: download + decode inputs, encode + upload outputs.

Every byte from the network is decoded with `resbm.codec` against the run's shape and codec
(size, hash, shape, dtype and finiteness checked) before compute sees it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from protocol.messages import FailReason, Hop, ObjectRef
from resbm import codec
from neurons.transfer import HashMismatch, ObjectTransfer, TransferError

__all__ = ["BadInput", "HopInputs", "fetch_code", "fetch_inputs", "encode_output", "fail_reason"]


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
    """Download and decode what `hop` needs; raises BadInput naming the object and the problem."""
    needs_act = hop.kind in ("fwd", "fwdbwd") or hop.recompute
    act = grad = None
    if needs_act and hop.stage > 0:
        if hop.act_in is None:
            raise BadInput("missing", f"hop {hop.hop_id} has no activation input")
        act = fetch_code(transfer, hop.act_in, shape, wire_codec)
    if hop.kind == "bwd":
        if hop.grad_in is None:
            raise BadInput("missing", f"hop {hop.hop_id} has no gradient input")
        grad = fetch_code(transfer, hop.grad_in, shape, wire_codec)
    return HopInputs(act=act, grad=grad)


def encode_output(t: torch.Tensor, wire_codec: str) -> tuple[bytes, str]:
    """Encoded bytes of an output tensor and their sha256."""
    data = codec.encode(t, wire_codec)
    return data, hashlib.sha256(data).hexdigest()

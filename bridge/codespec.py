"""What a hop output of this run must be: its exact shape, codec and wire size (from the run's
model config), and the check the bridge applies to a disputed output (pure: bytes in, verdict
out; `spec.activation_format` decodes, nothing is unpickled). Torch-free: the format's decoder is
the one the neurons' `resbm.codec` uses, so the bridge and a consumer agree on every object."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from protocol.messages import RunConfig
from spec.activation_format import ActivationFormat, CodecError
from spec.wire_format import TensorRole

__all__ = ["CodeSpec", "code_spec", "judge_bytes"]


@dataclass(frozen=True)
class CodeSpec:
    """One micro-batch's code (and its gradient) on the wire."""

    shape: tuple[int, ...]
    codec: str
    nbytes: int


def code_spec(run: RunConfig) -> CodeSpec:
    """The run's code shape, wire codec and exact encoded size; ValueError (one line, naming the
    field) when `run.model` is not a valid model config or the code exceeds max_object_bytes."""
    shape = tuple(run.parsed_model().code_shape(run.batch_size))
    fmt = run.wire_format(TensorRole.ACTIVATION)
    nbytes = fmt.size(shape)
    if nbytes > run.max_object_bytes:
        raise ValueError(f"a code of shape {shape} ({fmt.name}) is {nbytes} bytes, over "
                         f"max_object_bytes={run.max_object_bytes}: raise max_object_bytes")
    return CodeSpec(shape=shape, codec=fmt.name, nbytes=nbytes)


def judge_bytes(data: Optional[bytes], sha256: Optional[str], spec: CodeSpec) -> tuple[str, str]:
    """("ok" | "missing" | "bad", detail) for the bytes found at a recorded hop output."""
    if data is None:
        return "missing", "no object at the sealed key"
    have = hashlib.sha256(data).hexdigest()
    if sha256 is not None and have != sha256:
        return "bad", f"sha256 is {have[:16]}..., the producer reported {sha256[:16]}..."
    try:
        ActivationFormat(spec.codec).decode_array(data, spec.shape, max_bytes=spec.nbytes)
    except CodecError as exc:
        return "bad", f"{type(exc).__name__}: {str(exc)[:300]}"
    return "ok", f"sha256 matches, decodes to {spec.shape} {spec.codec}, finite"

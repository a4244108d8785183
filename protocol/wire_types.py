"""Shared vocabulary of the bridge wire messages: protocol version, enumerations, bounded field
constructors, object references, the error body and the plain acknowledgement."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from protocol.lifecycle import HopKind, Phase
from protocol.run_config import MAX_BYTES
from protocol.run_config import StrictModel as _Model

__all__ = [
    "PROTOCOL_VERSION",
    "HopKind",
    "LeaseAction",
    "FailReason",
    "Phase",
    "DeviceClass",
    "ComputeDtype",
    "device_name_field",
    "MAX_INT",
    "SHA_PATTERN",
    "sha_field",
    "key_field",
    "url_field",
    "hotkey_field",
    "hop_id_field",
    "round_field",
    "ErrorBody",
    "ObjectRef",
    "OutputRef",
    "StateRef",
    "Ack",
]

PROTOCOL_VERSION = "resbm/4"  # 4: unanimous-or-dispute votes, exact sync sizes, re-registration rule, batched Muon numerics

LeaseAction = Literal["work", "wait", "step", "merge", "reassign", "done"]
FailReason = Literal["bad_hash", "bad_shape", "nonfinite", "missing", "other"]

SHA_PATTERN = r"^[0-9a-f]{64}$"
MAX_INT = 2**62


def sha_field() -> Any:
    """A lowercase hex sha256."""
    return Field(pattern=SHA_PATTERN, min_length=64, max_length=64, description="lowercase hex sha256")


def key_field() -> Any:
    """An object key in the run's bucket."""
    return Field(min_length=1, max_length=512, description="object key in the run's bucket")


def url_field() -> Any:
    """A presigned URL."""
    return Field(min_length=1, max_length=4096, description="presigned URL")


def hotkey_field() -> Any:
    """An ss58 hotkey."""
    return Field(min_length=1, max_length=64, description="ss58 hotkey")


def hop_id_field() -> Any:
    """A hop id."""
    return Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="hop id")


def round_field() -> Any:
    """A round index."""
    return Field(ge=0, le=MAX_INT, description="round index")


DeviceClass = Literal["cpu", "cuda", "mps"]
"""Where a miner computes; validators replay in the same class when they can (docs/AUDIT.md)."""
ComputeDtype = Literal["float32", "bfloat16", "float16"]
"""A miner's compute dtype (float32, or bf16 / fp16 autocast with fp32 weights)."""


def device_name_field() -> Any:
    """A declared GPU model ('NVIDIA H100 80GB HBM3'; '' for none): audit tolerances are keyed by it."""
    return Field(default="", max_length=64, pattern=r"^[A-Za-z0-9 ._()/+-]*$",
                 description="GPU model the miner computes on ('' for a CPU or unknown)")


class ErrorBody(_Model):
    """Body of every non-2xx answer."""

    error: str = Field(max_length=64, description="short machine-readable code")
    message: str = Field(max_length=2000, description="what was wrong, naming the field")
    retry_after: Optional[float] = Field(default=None, ge=0, le=86_400)


class ObjectRef(_Model):
    """An object to download: key, presigned GET URL and the sha256 it must have."""

    key: str = key_field()
    url: str = url_field()
    sha256: str = sha_field()
    size: int = Field(ge=0, le=MAX_BYTES)


class OutputRef(_Model):
    """Where to upload a hop's output: presigned PUT signed for exactly `size` bytes."""

    key: str = key_field()
    put_url: str = url_field()
    size: int = Field(ge=1, le=MAX_BYTES)
    expires_at: float = Field(ge=0)


class StateRef(_Model):
    """A stage's published state (theta + outer momentum, safetensors) for a round."""

    round: int = round_field()
    stage: int = Field(ge=0, le=63)
    key: str = key_field()
    url: str = url_field()
    sha256: str = sha_field()
    size: int = Field(ge=0, le=MAX_BYTES)
    alt_urls: list[str] = Field(default_factory=list, max_length=1024,
                                description="other voters' copies of the same bytes, if `url` fails")


class Ack(_Model):
    """Generic success answer."""

    ok: bool = True
    message: str = Field(default="", max_length=1000)

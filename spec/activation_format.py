"""The activation codec's bytes: boundary codes and their gradients between stages (no torch).

Layout of an encoded tensor (all integers little-endian)::

    MAGIC (4 bytes) | format version (uint16) | JSON header, space-padded to HEADER_LEN bytes
    | scales (one per vector along the last dim; fp8/int8 only) | values | sha256 (32 bytes)

The sha256 covers everything before it. Because the header is padded to a fixed length, the
encoded size is a pure function of (shape, codec): `ActivationFormat.size` gives it exactly, so
the bridge signs an upload URL for an exact byte count before the tensor exists.

`ActivationFormat.decode_array` is the one decoder: it verifies every byte (size, magic, version,
header, codec, shape, sha256, finiteness) and returns the float32 values as a numpy array.
`resbm.codec` wraps them in a tensor; the bridge judges a disputed object with the same call, so
the bridge and a consumer can never disagree about whether an object is valid. Per-token scales
are bfloat16 (see resbm.codec for why). Nothing here unpickles anything.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from spec.wire_format import CodecError, TensorRole, WireFormat

__all__ = [
    "CODECS", "DEFAULT_CODEC", "FORMAT_VERSION", "HEADER_LEN", "MAGIC", "ActivationFormat", "CodecError",
    "DtypeMismatch", "HashMismatch", "MalformedHeader", "NonFinite", "Oversized", "ShapeMismatch",
    "Truncated", "UnknownVersion", "check_shape", "fp8_e4m3_values",
]

MAGIC = b"RBMW"
FORMAT_VERSION = 1
HEADER_LEN = 256
PREFIX = struct.Struct("<4sH")
DIGEST_LEN = 32
SCALE_BYTES = 2
_MAX_NDIM = 8
_MAX_DIM = 2**31 - 1

CODECS: tuple[str, ...] = ("fp32", "bf16", "fp8", "int8")
DEFAULT_CODEC = "bf16"

# codec -> (wire dtype name, element bytes, scale dtype name or None, largest code magnitude)
SPEC: dict[str, tuple[str, int, str | None, float | None]] = {
    "fp32": ("float32", 4, None, None),
    "bf16": ("bfloat16", 2, None, None),
    "fp8": ("float8_e4m3fn", 1, "bfloat16", 448.0),
    "int8": ("int8", 1, "bfloat16", 127.0),
}
_HEADER_KEYS = {"v", "dtype", "shape", "codec", "scale_dtype"}


class ShapeMismatch(CodecError):
    """The header's shape differs from the expected shape."""


class DtypeMismatch(CodecError):
    """The header's codec, dtype or scale dtype differs from the expected codec."""


class Truncated(CodecError):
    """Fewer bytes than the header and expected shape require."""


class Oversized(CodecError):
    """More bytes than allowed (max_bytes) or than the expected shape requires."""


class HashMismatch(CodecError):
    """The trailing sha256 does not match the header and payload."""


class UnknownVersion(CodecError):
    """The format version is not one this decoder reads."""


class NonFinite(CodecError):
    """NaN or Inf in the values or scales."""


class MalformedHeader(CodecError):
    """Bad magic, or a header that is not the expected JSON object."""


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """`shape` as a tuple of ints (1..8 dims, each 1..2^31-1); CodecError otherwise."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise CodecError(f"shape must be a sequence of ints, got {shape!r}") from None
    if not 1 <= len(dims) <= _MAX_NDIM:
        raise CodecError(f"shape must have 1..{_MAX_NDIM} dims, got {len(dims)}: {dims}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= int(d) <= _MAX_DIM:
            raise CodecError(f"every dim must be an int in 1..{_MAX_DIM}, got {dims}")
    return tuple(int(d) for d in dims)


@functools.cache
def fp8_e4m3_values() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn codes (sign, 4-bit exponent with bias 7, 3-bit
    mantissa, subnormals at exponent 0, NaN at S.1111.111, no infinities); exact, like torch's cast."""
    out = np.empty(256, np.float32)
    for c in range(256):
        sign = -1.0 if c & 0x80 else 1.0
        e, m = (c >> 3) & 0xF, c & 0x7
        if e == 0xF and m == 0x7:
            out[c] = np.nan
        elif e == 0:
            out[c] = sign * m / 8 * 2.0**-6
        else:
            out[c] = sign * (1 + m / 8) * 2.0 ** (e - 7)
    out.setflags(write=False)
    return out


def _values(buf: memoryview, offset: int, count: int, dtype: str) -> np.ndarray:
    """`count` values of a wire dtype at `offset`, as float32 (an exact widening)."""
    if dtype == "float32":
        return np.frombuffer(buf, "<f4", count, offset).astype(np.float32)
    if dtype == "bfloat16":  # a bfloat16 is the top half of the float32 with the same bits
        return (np.frombuffer(buf, "<u2", count, offset).astype(np.uint32) << 16).view(np.float32)
    codes = np.frombuffer(buf, np.uint8, count, offset)
    if dtype == "float8_e4m3fn":
        return fp8_e4m3_values()[codes]
    return codes.view(np.int8).astype(np.float32)  # int8


@dataclass(frozen=True)
class ActivationFormat(WireFormat):
    """The activation codec `name` (one of CODECS): sizes, header and the verifying decoder."""

    name: str = DEFAULT_CODEC
    roles: ClassVar[frozenset[TensorRole]] = frozenset({TensorRole.ACTIVATION, TensorRole.ACTIVATION_GRAD})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in SPEC:
            raise CodecError(f"unknown codec {self.name!r}; expected one of {list(CODECS)}")

    @property
    def wire_dtype(self) -> str:
        """Name of the values' dtype on the wire."""
        return SPEC[self.name][0]

    @property
    def element_bytes(self) -> int:
        """Bytes per value on the wire."""
        return SPEC[self.name][1]

    @property
    def scale_dtype(self) -> str | None:
        """Name of the per-vector scales' dtype (None for unscaled codecs)."""
        return SPEC[self.name][2]

    @property
    def qmax(self) -> float | None:
        """Largest code magnitude of a scaled codec (None for unscaled codecs)."""
        return SPEC[self.name][3]

    @property
    def scale_bytes_per_vector(self) -> int:
        """Bytes of scale per vector along the last dim (0 for unscaled codecs)."""
        return SCALE_BYTES if self.scale_dtype else 0

    @staticmethod
    def overhead_bytes() -> int:
        """Fixed bytes per encoded tensor besides scales and values (prefix, header, digest)."""
        return PREFIX.size + HEADER_LEN + DIGEST_LEN

    def size(self, shape: Sequence[int] | int) -> int:
        """Exact length of an encoded tensor of `shape`."""
        dims = check_shape((shape,) if isinstance(shape, int) else shape)
        numel = math.prod(dims)
        return self.overhead_bytes() + numel // dims[-1] * self.scale_bytes_per_vector + numel * self.element_bytes

    def head(self, dims: tuple[int, ...]) -> bytes:
        """The prefix and padded JSON header of an encoded tensor of shape `dims`."""
        obj = {"v": FORMAT_VERSION, "dtype": self.wire_dtype, "shape": list(dims), "codec": self.name,
               "scale_dtype": self.scale_dtype}
        raw = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("ascii")
        if len(raw) > HEADER_LEN:  # unreachable within check_shape's bounds; kept as a guard
            raise CodecError(f"header of {len(raw)} bytes exceeds HEADER_LEN={HEADER_LEN}")
        return PREFIX.pack(MAGIC, FORMAT_VERSION) + raw.ljust(HEADER_LEN, b" ")

    def decode_array(self, data: bytes | bytearray | memoryview, shape: Sequence[int],
               max_bytes: int) -> np.ndarray:
        """Verify an encoded tensor of `shape` and return its float32 values; CodecError otherwise."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError(f"decode needs bytes, got {type(data).__name__}")
        n = memoryview(data).nbytes
        if n > max_bytes:
            raise Oversized(f"{n} bytes exceeds max_bytes={max_bytes}")
        dims = check_shape(shape)
        buf = memoryview(data).cast("B")
        fixed = PREFIX.size + HEADER_LEN
        if n < fixed:
            raise Truncated(f"{n} bytes is shorter than the {fixed}-byte prefix and header")
        magic, version = PREFIX.unpack_from(buf, 0)
        if magic != MAGIC:
            raise MalformedHeader(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise UnknownVersion(f"format version {version}, this decoder reads {FORMAT_VERSION}")
        hdr = _parse_header(bytes(buf[PREFIX.size:fixed]))
        if hdr["codec"] != self.name:
            raise DtypeMismatch(f"codec {hdr['codec']!r} in header, expected {self.name!r}")
        if hdr["dtype"] != self.wire_dtype or hdr["scale_dtype"] != self.scale_dtype:
            raise DtypeMismatch(f"header dtype/scale_dtype {hdr['dtype']!r}/{hdr['scale_dtype']!r}, "
                                f"expected {self.wire_dtype!r}/{self.scale_dtype!r} for codec {self.name!r}")
        if tuple(hdr["shape"]) != dims:
            raise ShapeMismatch(f"shape {tuple(hdr['shape'])} in header, expected {dims}")
        want = self.size(dims)
        if n != want:
            kind = Truncated if n < want else Oversized
            raise kind(f"{n} bytes, expected exactly {want} for shape {dims} codec {self.name!r}")
        body_len = n - DIGEST_LEN
        digest = hashlib.sha256(buf[:body_len]).digest()
        if digest != bytes(buf[body_len:]):
            raise HashMismatch(f"sha256 mismatch: computed {digest.hex()[:16]}..., "
                               f"stored {bytes(buf[body_len:]).hex()[:16]}...")
        numel, off = math.prod(dims), fixed
        values = _values(buf, off + (numel // dims[-1]) * self.scale_bytes_per_vector, numel, self.wire_dtype)
        out = values.reshape(dims)
        if self.scale_dtype is not None:
            scale = _values(buf, off, numel // dims[-1], self.scale_dtype).reshape(*dims[:-1], 1)
            if not np.isfinite(scale).all():
                raise NonFinite("scales contain NaN or Inf")
            with np.errstate(over="ignore", invalid="ignore"):
                out = out * scale  # float32 x float32, as the encoder's dequantisation
        if not np.isfinite(out).all():
            raise NonFinite(f"decoded values of shape {dims} contain NaN or Inf")
        return out


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedHeader("header is not ASCII") from None

    def _no_constants(name: str) -> Any:
        raise MalformedHeader(f"header contains the non-JSON constant {name}")

    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise MalformedHeader(f"header is not valid JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(obj, dict):
        raise MalformedHeader(f"header must be a JSON object, got {type(obj).__name__}")
    if set(obj) != _HEADER_KEYS:
        raise MalformedHeader(f"header keys {sorted(obj)} != expected {sorted(_HEADER_KEYS)}")
    v = obj["v"]
    if isinstance(v, bool) or not isinstance(v, int):
        raise MalformedHeader(f"header 'v' must be an int, got {v!r}")
    if v != FORMAT_VERSION:
        raise UnknownVersion(f"header format version {v}, this decoder reads {FORMAT_VERSION}")
    for key in ("dtype", "codec"):
        if not isinstance(obj[key], str):
            raise MalformedHeader(f"header {key!r} must be a string, got {obj[key]!r}")
    if obj["scale_dtype"] is not None and not isinstance(obj["scale_dtype"], str):
        raise MalformedHeader(f"header 'scale_dtype' must be a string or null, got {obj['scale_dtype']!r}")
    shape = obj["shape"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= _MAX_NDIM
            or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= _MAX_DIM
                   for d in shape)):
        raise MalformedHeader(f"header 'shape' must be a list of 1..{_MAX_NDIM} positive ints, got {shape!r}")
    return obj

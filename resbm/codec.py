"""Wire codec for tensors that cross the network (boundary codes and their gradients).

Layout of an encoded tensor (all integers little-endian)::

    MAGIC (4 bytes) | format version (uint16) | JSON header, space-padded to HEADER_LEN bytes
    | scales (one per vector along the last dim; fp8/int8 only) | values | sha256 (32 bytes)

The sha256 covers everything before it. Because the header is padded to a fixed length, the
encoded size is a pure function of (shape, codec): `wire_size` gives it exactly, so a
coordinator can sign an upload URL for an exact byte count before the tensor exists.

Per-token scales are stored as bfloat16: two bytes per vector keeps the overhead at 2/k bytes
per element (k = 8 at 128x compression, so fp32 scales would add 50%), and bf16 has fp32's
exponent range, so the tiny scales of gradients (1e-10 and below) neither underflow nor
overflow as they would in fp16. Quantisation divides by the *rounded* scale, so the scale's
3-digit precision costs no accuracy. Nothing here unpickles anything.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import struct
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "HEADER_LEN",
    "MAGIC",
    "CodecError",
    "DtypeMismatch",
    "HashMismatch",
    "MalformedHeader",
    "NonFinite",
    "Oversized",
    "ShapeMismatch",
    "Truncated",
    "UnknownVersion",
    "decode",
    "element_bytes",
    "encode",
    "fake_quantize",
    "fake_quantize_grad",
    "overhead_bytes",
    "roundtrip",
    "scale_bytes_per_vector",
    "wire_size",
]

log = logging.getLogger(__name__)

MAGIC = b"RBMW"
FORMAT_VERSION = 1
HEADER_LEN = 256
_PREFIX = struct.Struct("<4sH")
_DIGEST_LEN = 32
_MAX_NDIM = 8
_MAX_DIM = 2**31 - 1

CODECS: tuple[str, ...] = ("fp32", "bf16", "fp8", "int8")
DEFAULT_CODEC = "bf16"

# codec -> (wire dtype name, element bytes, scale dtype name or None, largest code magnitude)
_SPEC: dict[str, tuple[str, int, str | None, float | None]] = {
    "fp32": ("float32", 4, None, None),
    "bf16": ("bfloat16", 2, None, None),
    "fp8": ("float8_e4m3fn", 1, "bfloat16", 448.0),
    "int8": ("int8", 1, "bfloat16", 127.0),
}
_SCALE_BYTES = 2
_HEADER_KEYS = {"v", "dtype", "shape", "codec", "scale_dtype"}


class CodecError(ValueError):
    """Base class of every rejection by the wire codec."""


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


def _check_codec(codec: str) -> tuple[str, int, str | None, float | None]:
    if not isinstance(codec, str) or codec not in _SPEC:
        raise CodecError(f"unknown codec {codec!r}; expected one of {list(CODECS)}")
    return _SPEC[codec]


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
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


def element_bytes(codec: str) -> int:
    """Bytes per value on the wire for `codec`."""
    return _check_codec(codec)[1]


def scale_bytes_per_vector(codec: str) -> int:
    """Bytes of scale per vector along the last dim (0 for unscaled codecs)."""
    return _SCALE_BYTES if _check_codec(codec)[2] else 0


def overhead_bytes() -> int:
    """Fixed bytes per encoded tensor besides scales and values (prefix, header, digest)."""
    return _PREFIX.size + HEADER_LEN + _DIGEST_LEN


def wire_size(shape: Sequence[int], codec: str) -> int:
    """Exact length of `encode(t, codec)` for any tensor `t` of `shape`."""
    dims = _check_shape(shape)
    numel = math.prod(dims)
    n_vec = numel // dims[-1]
    return overhead_bytes() + n_vec * scale_bytes_per_vector(codec) + numel * element_bytes(codec)


def _quantize(x: torch.Tensor, codec: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """float32 x -> (bf16 scales [..., 1] or None, values in the wire dtype)."""
    if codec == "fp32":
        return None, x
    if codec == "bf16":
        return None, x.to(torch.bfloat16)
    qmax = _SPEC[codec][3]
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = (amax / qmax).to(torch.bfloat16)
    s = scale.float()
    # An all-zero vector (or one whose scale underflows) is divided by 1: its codes are 0 either way.
    s = torch.where(s == 0, torch.ones_like(s), s)
    y = (x / s).clamp(-qmax, qmax)
    if codec == "fp8":
        return scale, y.to(torch.float8_e4m3fn)
    return scale, torch.round(y).to(torch.int8)


def _dequantize(scale: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    if scale is None:
        return values.float()
    return values.float() * scale.float()


def roundtrip(x: torch.Tensor, codec: str) -> torch.Tensor:
    """What the receiver decodes for x (float32, no gradient); equals decode(encode(x))."""
    _check_codec(codec)
    xf = x.detach().float()
    return _dequantize(*_quantize(xf, codec))


def _header_bytes(dims: tuple[int, ...], codec: str) -> bytes:
    dtype, _, scale_dtype, _ = _SPEC[codec]
    obj = {"v": FORMAT_VERSION, "dtype": dtype, "shape": list(dims), "codec": codec,
           "scale_dtype": scale_dtype}
    raw = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("ascii")
    if len(raw) > HEADER_LEN:  # unreachable within _check_shape's bounds; kept as a guard
        raise CodecError(f"header of {len(raw)} bytes exceeds HEADER_LEN={HEADER_LEN}")
    return raw.ljust(HEADER_LEN, b" ")


def _raw_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a CPU tensor of a wire dtype."""
    if t.dtype == torch.float32:
        return t.contiguous().numpy().astype("<f4", copy=False).tobytes()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    if t.dtype == torch.float8_e4m3fn:
        return t.contiguous().view(torch.uint8).numpy().tobytes()
    return t.contiguous().numpy().tobytes()  # int8


def encode(tensor: torch.Tensor, codec: str = DEFAULT_CODEC) -> bytes:
    """Serialise a float tensor with `codec`; raises NonFinite on NaN/Inf (or bf16 overflow)."""
    _check_codec(codec)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise CodecError(f"encode needs a floating-point torch.Tensor, got {type(tensor).__name__}"
                         + (f" of {tensor.dtype}" if isinstance(tensor, torch.Tensor) else ""))
    dims = _check_shape(tuple(tensor.shape))
    x = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise NonFinite(f"input tensor of shape {dims} contains NaN or Inf; refusing to encode")
    scale, values = _quantize(x, codec)
    if codec == "bf16" and not bool(torch.isfinite(values).all()):
        raise NonFinite("input exceeds the bfloat16 range (values would become Inf)")
    # |code| <= qmax, so a finite qmax * scale means every decoded value is finite (a guard:
    # bf16 rounding of amax / qmax cannot push qmax * scale past float32's max for finite x).
    if scale is not None and not bool(torch.isfinite(scale.float() * _SPEC[codec][3]).all()):
        raise NonFinite("input magnitude too large: scaled values would decode to Inf")
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION), _header_bytes(dims, codec)]
    if scale is not None:
        parts.append(_raw_bytes(scale))
    parts.append(_raw_bytes(values))
    body = b"".join(parts)
    out = body + hashlib.sha256(body).digest()
    if len(out) != wire_size(dims, codec):  # guards the size contract the bridge signs against
        raise AssertionError(f"encoded {len(out)} bytes, wire_size says {wire_size(dims, codec)}")
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


def _tensor_from(data: memoryview, offset: int, count: int, codec_dtype: str) -> torch.Tensor:
    if codec_dtype == "float32":
        return torch.from_numpy(np.frombuffer(data, "<f4", count, offset).astype(np.float32))
    if codec_dtype == "bfloat16":
        arr = np.frombuffer(data, "<i2", count, offset).astype(np.int16)
        return torch.from_numpy(arr).view(torch.bfloat16)
    arr = np.frombuffer(data, np.uint8, count, offset)
    if codec_dtype == "float8_e4m3fn":
        # A 256-entry table holds torch's own fp8 -> fp32 conversion of every code (bit-exact),
        # and is several times faster than the tensor cast on CPU.
        return torch.from_numpy(_fp8_table()[arr])
    return torch.from_numpy(arr.copy()).view(torch.int8)


@functools.cache
def _fp8_table() -> np.ndarray:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    return codes.float().numpy()


def decode(data: bytes | bytearray | memoryview, expected_shape: Sequence[int],
           expected_codec: str, max_bytes: int) -> torch.Tensor:
    """Parse and verify an encoded tensor; returns float32 of expected_shape or raises CodecError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"decode needs bytes, got {type(data).__name__}")
    n = memoryview(data).nbytes
    if n > max_bytes:
        raise Oversized(f"{n} bytes exceeds max_bytes={max_bytes}")
    spec = _check_codec(expected_codec)
    dims = _check_shape(expected_shape)
    buf = memoryview(data).cast("B")
    fixed = _PREFIX.size + HEADER_LEN
    if n < fixed:
        raise Truncated(f"{n} bytes is shorter than the {fixed}-byte prefix and header")
    magic, version = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise MalformedHeader(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise UnknownVersion(f"format version {version}, this decoder reads {FORMAT_VERSION}")
    hdr = _parse_header(bytes(buf[_PREFIX.size:fixed]))
    if hdr["codec"] != expected_codec:
        raise DtypeMismatch(f"codec {hdr['codec']!r} in header, expected {expected_codec!r}")
    if hdr["dtype"] != spec[0] or hdr["scale_dtype"] != spec[2]:
        raise DtypeMismatch(f"header dtype/scale_dtype {hdr['dtype']!r}/{hdr['scale_dtype']!r}, "
                            f"expected {spec[0]!r}/{spec[2]!r} for codec {expected_codec!r}")
    if tuple(hdr["shape"]) != dims:
        raise ShapeMismatch(f"shape {tuple(hdr['shape'])} in header, expected {dims}")
    want = wire_size(dims, expected_codec)
    if n < want:
        raise Truncated(f"{n} bytes, expected exactly {want} for shape {dims} codec {expected_codec!r}")
    if n > want:
        raise Oversized(f"{n} bytes, expected exactly {want} for shape {dims} codec {expected_codec!r}")
    body_len = n - _DIGEST_LEN
    digest = hashlib.sha256(buf[:body_len]).digest()
    if digest != bytes(buf[body_len:]):
        raise HashMismatch(f"sha256 mismatch: computed {digest.hex()[:16]}..., "
                           f"stored {bytes(buf[body_len:]).hex()[:16]}...")
    numel = math.prod(dims)
    off = fixed
    scale = None
    if spec[2] is not None:
        n_vec = numel // dims[-1]
        scale = _tensor_from(buf, off, n_vec, spec[2]).reshape(*dims[:-1], 1)
        off += n_vec * _SCALE_BYTES
        if not bool(torch.isfinite(scale).all()):
            raise NonFinite("scales contain NaN or Inf")
    values = _tensor_from(buf, off, numel, spec[0]).reshape(dims)
    out = _dequantize(scale, values)
    if not bool(torch.isfinite(out).all()):
        raise NonFinite(f"decoded values of shape {dims} contain NaN or Inf")
    return out


class _FakeQuant(torch.autograd.Function):
    """Forward: the wire round trip; backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codec: str) -> torch.Tensor:
        return roundtrip(x, codec).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _FakeQuantGrad(torch.autograd.Function):
    """Forward: identity; backward: the wire round trip of the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codec: str) -> torch.Tensor:
        ctx.codec = codec
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return roundtrip(grad, ctx.codec).to(grad.dtype), None


def fake_quantize(x: torch.Tensor, codec: str) -> torch.Tensor:
    """Bit-exact decode(encode(x, codec)) in x's dtype and device, with a straight-through gradient."""
    _check_codec(codec)
    if codec == "fp32":
        return x
    return _FakeQuant.apply(x, codec)


def fake_quantize_grad(x: torch.Tensor, codec: str) -> torch.Tensor:
    """Identity forward; the gradient flowing back through it is round-tripped through `codec`."""
    _check_codec(codec)
    if codec == "fp32":
        return x
    return _FakeQuantGrad.apply(x, codec)

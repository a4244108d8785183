"""Deterministic blockwise low-bit codec for pseudo-gradient and merged-update shards.

A shard is a 1-D fp32 vector. It is cut into blocks of `block` values; each block keeps one fp32
scale (its largest magnitude / qmax) and one signed code per value, `round(x / scale)` clamped to
[-qmax, qmax] (qmax = 2^(bits-1) - 1: 127 for int8, 7 for int4, 1 for int2). Codes are stored
offset by qmax as unsigned `bits`-bit fields packed little-end first into bytes.

Bit-identical everywhere: the block maximum is exact, the division and the round (half to even)
are element-wise IEEE operations, and decoding is one element-wise multiply; so a validator that
replays a miner's pseudo-gradient encodes it to the same bytes, and encoding or decoding on a GPU
(the vector's device; `decode(..., device=)`) gives the CPU's bytes and values
(neurons/sync_device.py checks this on the miner's GPU before using it). Blobs are safetensors (no pickle)
with fixed key order and no metadata.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from resbm.outer import StateError

__all__ = ["CODECS", "Codec", "parse_codec", "encode", "decode", "roundtrip", "encoded_size", "check_sizes", "blob_sha"]

CODECS = ("fp32", "int8", "int4", "int2")


@dataclass(frozen=True)
class Codec:
    """A codec: `name` in CODECS and the block length (values per fp32 scale)."""

    name: str = "int8"
    block: int = 256

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"codec {self.name!r} is not one of {', '.join(CODECS)}")
        if not (isinstance(self.block, int) and 8 <= self.block <= 1 << 20 and self.block % 8 == 0):
            raise ValueError(f"codec block {self.block!r} must be a multiple of 8 in [8, 2^20]")

    @property
    def bits(self) -> int:
        """Bits per value (32 for fp32)."""
        return 32 if self.name == "fp32" else int(self.name[3:])

    @property
    def qmax(self) -> int:
        """Largest code magnitude."""
        return (1 << (self.bits - 1)) - 1


def parse_codec(name: str, block: int = 256) -> Codec:
    """A Codec from its name and block length (ValueError with a clear message when bad)."""
    return Codec(name, block)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.numel()
    nb = max(1, math.ceil(n / block))
    if nb * block != n:
        x = torch.cat([x, x.new_zeros(nb * block - n)])
    return x.view(nb, block)


def _quantize(x: torch.Tensor, c: Codec) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as int16 in [-qmax, qmax], per-block fp32 scales) of a flat vector."""
    b = _blocks(x, c.block)
    amax = b.abs().amax(dim=1)
    scale = amax / torch.tensor(float(c.qmax), dtype=torch.float32, device=x.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(b / safe[:, None]).clamp_(-c.qmax, c.qmax).to(torch.int16)
    return q.reshape(-1)[: x.numel()], scale


def _pack(q: torch.Tensor, c: Codec) -> torch.Tensor:
    u = (q + c.qmax).to(torch.uint8)
    per = 8 // c.bits
    if per == 1:
        return u
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    u = u.view(-1, per)
    out = torch.zeros(u.shape[0], dtype=torch.uint8, device=u.device)
    for j in range(per):
        out |= u[:, j] << (j * c.bits)
    return out


def _unpack(p: torch.Tensor, n: int, c: Codec) -> torch.Tensor:
    per = 8 // c.bits
    if per == 1:
        u = p
    else:
        mask = (1 << c.bits) - 1
        u = torch.stack([(p >> (j * c.bits)) & mask for j in range(per)], dim=1).reshape(-1)
    return u[:n].to(torch.int16) - c.qmax


def encode(x: torch.Tensor, c: Codec) -> bytes:
    """Canonical bytes of flat fp32 vector `x` under codec `c` (non-finite input is refused);
    quantized on x's device."""
    x = x.detach().to(dtype=torch.float32).reshape(-1).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise StateError("cannot encode a vector with NaN or Inf")
    header = torch.tensor([x.numel(), c.bits, c.block], dtype=torch.int64)
    if c.name == "fp32":
        return _st_save({"h": header, "x": x.cpu()})
    q, scale = _quantize(x, c)
    return _st_save({"h": header, "q": _pack(q, c).cpu(), "s": scale.cpu().contiguous()})


def decode(blob: bytes, n: int, c: Codec, max_bytes: int | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """The fp32 vector of `n` values that `blob` encodes under `c` (on `device`, default the CPU);
    StateError when it does not."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise StateError(f"expected bytes, got {type(blob).__name__}")
    want = encoded_size(n, c)
    if max_bytes is not None and len(blob) > max_bytes:
        raise StateError(f"shard object is {len(blob)} bytes, over the {max_bytes} allowed")
    if len(blob) != want:  # oversized or truncated: refused before parsing
        raise StateError(f"shard object is {len(blob)} bytes; {n} {c.name} values encode to exactly {want}")
    try:
        d = _st_load(bytes(blob))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StateError(f"not a valid shard object: {exc}") from None
    want = {"h", "x"} if c.name == "fp32" else {"h", "q", "s"}
    if set(d) != want:
        raise StateError(f"shard keys {sorted(d)}, expected {sorted(want)} for codec {c.name}")
    h = d["h"]
    if h.dtype != torch.int64 or h.tolist() != [n, c.bits, c.block]:
        raise StateError(f"shard header {h.tolist()}, expected [{n}, {c.bits}, {c.block}]")
    if c.name == "fp32":
        x = d["x"]
        if x.dtype != torch.float32 or tuple(x.shape) != (n,):
            raise StateError(f"fp32 shard: {x.dtype} {tuple(x.shape)}, expected float32 ({n},)")
        x = x.to(device or "cpu")
    else:
        nb = max(1, math.ceil(n / c.block))
        q, s = d["q"], d["s"]
        if q.dtype != torch.uint8 or tuple(q.shape) != (math.ceil(n * c.bits / 8),):
            raise StateError(f"codes: {q.dtype} {tuple(q.shape)}, expected uint8 ({math.ceil(n * c.bits / 8)},)")
        if s.dtype != torch.float32 or tuple(s.shape) != (nb,) or not bool((s >= 0).all()):
            raise StateError(f"scales: {s.dtype} {tuple(s.shape)}, expected float32 ({nb},), >= 0")
        codes = _unpack(q.to(device or "cpu"), n, c)
        if bool((codes.abs() > c.qmax).any()):
            raise StateError(f"codes outside [-{c.qmax}, {c.qmax}]")
        x = _dequantize(codes, s.to(codes.device), n, c.block)
    if not bool(torch.isfinite(x).all()):
        raise StateError("shard contains NaN or Inf")
    return x


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """codes x their block's scale (one multiply per value), without a full-length scale vector."""
    nb = scale.numel()
    full = codes.to(torch.float32)
    if nb * block != n:
        full = torch.cat([full, full.new_zeros(nb * block - n)])
    return (full.view(nb, block) * scale[:, None]).reshape(-1)[:n]


def roundtrip(x: torch.Tensor, c: Codec) -> torch.Tensor:
    """decode(encode(x)) computed in place on x's device (what the wire does to x)."""
    if c.name == "fp32":
        return x.to(torch.float32)
    flat = x.reshape(-1).to(torch.float32)
    q, scale = _quantize(flat, c)
    return _dequantize(q, scale, flat.numel(), c.block).view_as(x)


def encoded_size(n: int, c: Codec) -> int:
    """The exact byte length of encode() of any n-value vector under `c` (header included).

    encode() writes fixed names, dtypes and shapes, so the length depends on (n, codec) alone:
    8 bytes of header length, the safetensors JSON header (tensors ordered by dtype size, then
    name; padded with spaces to a multiple of 8), then the data. `check_sizes` compares this with
    a real encode; the bridge runs it at start-up and ties every sync grant to these sizes."""
    if n < 1:
        raise ValueError(f"a shard has at least one value, got n={n}")
    entries = [("h", "I64", 3, 24)]
    if c.name == "fp32":
        entries.append(("x", "F32", n, 4 * n))
    else:
        nb, nq = max(1, math.ceil(n / c.block)), math.ceil(n * c.bits / 8)
        entries += [("s", "F32", nb, 4 * nb), ("q", "U8", nq, nq)]
    off, parts = 0, []
    for name, dtype, k, nbytes in entries:
        parts.append(f'"{name}":{{"dtype":"{dtype}","shape":[{k}],"data_offsets":[{off},{off + nbytes}]}}')
        off += nbytes
    header = len("{" + ",".join(parts) + "}")
    return 8 + header + (-header) % 8 + off


def check_sizes(lengths: tuple[int, ...] = (1, 9, 257, 4099)) -> None:
    """RuntimeError when encoded_size disagrees with a real encode (another safetensors layout)."""
    for name in CODECS:
        c = Codec(name, 64)
        for n in lengths:
            have = len(encode(torch.zeros(n), c))
            if have != encoded_size(n, c):
                raise RuntimeError(f"safetensors writes {have} bytes for {n} {name} values, resbm.sync_codec "
                                   f"computes {encoded_size(n, c)}: this safetensors version is unsupported")


def blob_sha(blob: bytes) -> str:
    """Hex sha256 of a shard blob."""
    return hashlib.sha256(blob).hexdigest()

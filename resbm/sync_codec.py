"""The block codec on tensors: pseudo-gradient pieces and merged updates of the sharded sync.

A shard is a 1-D fp32 vector. It is cut into blocks of `block` values; each block keeps one fp32
scale (its largest magnitude / qmax) and one signed code per value, `round(x / scale)` clamped to
[-qmax, qmax] (qmax = 2^(bits-1) - 1: 127 for int8, 7 for int4, 1 for int2). Codes are stored
offset by qmax as unsigned `bits`-bit fields packed little-end first into bytes.

Bit-identical everywhere: the block maximum is exact, the division and the round (half to even)
are element-wise IEEE operations, and decoding is one element-wise multiply; so a validator that
replays a miner's pseudo-gradient encodes it to the same bytes, and encoding or decoding on a GPU
(the vector's device; `decode(..., device=)`) gives the CPU's bytes and values
(neurons/sync_device.py checks this on the miner's GPU before using it). Blobs are safetensors (no pickle)
with fixed key order and no metadata; their exact sizes are torch-free in `spec.block_format`.
`BlockCodec` (also called `Codec` here) is this family's `resbm.codec_base.TensorCodec`.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from resbm.codec_base import TensorCodec
from resbm.outer import StateError
from spec.block_format import CODECS, BlockFormat
from spec.wire_format import CodecError

__all__ = ["CODECS", "BlockCodec", "Codec", "ShardError", "parse_codec", "encode", "decode", "roundtrip",
           "encoded_size", "check_sizes", "blob_sha"]


class ShardError(StateError, CodecError):
    """A shard object or vector the block codec refuses (a StateError, and a CodecError like every codec's)."""


class BlockCodec(BlockFormat, TensorCodec):
    """A block codec on tensors: `name` in CODECS and the block length (values per fp32 scale)."""

    def encode(self, x: torch.Tensor) -> bytes:
        """Canonical bytes of flat fp32 vector `x` (non-finite input is refused)."""
        return encode(x, self)

    def decode(self, data: bytes | bytearray | memoryview, shape: Sequence[int] | int,
               max_bytes: int | None = None) -> torch.Tensor:
        """The fp32 vector of `shape` values (an int, or a shape's product) that `data` encodes."""
        return decode(data, shape if isinstance(shape, int) else math.prod(shape), self, max_bytes)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) computed in place on x's device (what the wire does to x)."""
        return roundtrip(x, self)


Codec = BlockCodec
"""The name the sync modules use for a block codec (`Codec(name, block)`)."""


def parse_codec(name: str, block: int = 256) -> BlockCodec:
    """A block codec from its name and block length (ValueError with a clear message when bad)."""
    return BlockCodec(name, block)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.numel()
    nb = max(1, math.ceil(n / block))
    if nb * block != n:
        x = torch.cat([x, x.new_zeros(nb * block - n)])
    return x.view(nb, block)


def _quantize(x: torch.Tensor, c: BlockFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as int16 in [-qmax, qmax], per-block fp32 scales) of a flat vector."""
    b = _blocks(x, c.block)
    amax = b.abs().amax(dim=1)
    scale = amax / torch.tensor(float(c.qmax), dtype=torch.float32, device=x.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(b / safe[:, None]).clamp_(-c.qmax, c.qmax).to(torch.int16)
    return q.reshape(-1)[: x.numel()], scale


def _pack(q: torch.Tensor, c: BlockFormat) -> torch.Tensor:
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


def _unpack(p: torch.Tensor, n: int, c: BlockFormat) -> torch.Tensor:
    per = 8 // c.bits
    if per == 1:
        u = p
    else:
        mask = (1 << c.bits) - 1
        u = torch.stack([(p >> (j * c.bits)) & mask for j in range(per)], dim=1).reshape(-1)
    return u[:n].to(torch.int16) - c.qmax


def encode(x: torch.Tensor, c: BlockFormat) -> bytes:
    """Canonical bytes of flat fp32 vector `x` under codec `c` (non-finite input is refused);
    quantized on x's device."""
    x = x.detach().to(dtype=torch.float32).reshape(-1).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ShardError("cannot encode a vector with NaN or Inf")
    header = torch.tensor([x.numel(), c.bits, c.block], dtype=torch.int64)
    if c.name == "fp32":
        blob = _st_save({"h": header, "x": x.cpu()})
    else:
        q, scale = _quantize(x, c)
        blob = _st_save({"h": header, "q": _pack(q, c).cpu(), "s": scale.cpu().contiguous()})
    if len(blob) != c.size(x.numel()):  # the bridge grants exactly c.size(n) bytes for this object
        raise RuntimeError(f"safetensors writes {len(blob)} bytes for {x.numel()} {c.name} values, "
                           f"spec.block_format computes {c.size(x.numel())}: this safetensors version is unsupported")
    return blob


def decode(blob: bytes, n: int, c: BlockFormat, max_bytes: int | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """The fp32 vector of `n` values that `blob` encodes under `c` (on `device`, default the CPU);
    ShardError (a StateError) when it does not."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ShardError(f"expected bytes, got {type(blob).__name__}")
    want = encoded_size(n, c)
    if max_bytes is not None and len(blob) > max_bytes:
        raise ShardError(f"shard object is {len(blob)} bytes, over the {max_bytes} allowed")
    if len(blob) != want:  # oversized or truncated: refused before parsing
        raise ShardError(f"shard object is {len(blob)} bytes; {n} {c.name} values encode to exactly {want}")
    try:
        d = _st_load(bytes(blob))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ShardError(f"not a valid shard object: {exc}") from None
    want = {"h", "x"} if c.name == "fp32" else {"h", "q", "s"}
    if set(d) != want:
        raise ShardError(f"shard keys {sorted(d)}, expected {sorted(want)} for codec {c.name}")
    h = d["h"]
    if h.dtype != torch.int64 or h.tolist() != [n, c.bits, c.block]:
        raise ShardError(f"shard header {h.tolist()}, expected [{n}, {c.bits}, {c.block}]")
    if c.name == "fp32":
        x = d["x"]
        if x.dtype != torch.float32 or tuple(x.shape) != (n,):
            raise ShardError(f"fp32 shard: {x.dtype} {tuple(x.shape)}, expected float32 ({n},)")
        x = x.to(device or "cpu")
    else:
        nb = max(1, math.ceil(n / c.block))
        q, s = d["q"], d["s"]
        if q.dtype != torch.uint8 or tuple(q.shape) != (math.ceil(n * c.bits / 8),):
            raise ShardError(f"codes: {q.dtype} {tuple(q.shape)}, expected uint8 ({math.ceil(n * c.bits / 8)},)")
        if s.dtype != torch.float32 or tuple(s.shape) != (nb,) or not bool((s >= 0).all()):
            raise ShardError(f"scales: {s.dtype} {tuple(s.shape)}, expected float32 ({nb},), >= 0")
        codes = _unpack(q.to(device or "cpu"), n, c)
        if bool((codes.abs() > c.qmax).any()):
            raise ShardError(f"codes outside [-{c.qmax}, {c.qmax}]")
        x = _dequantize(codes, s.to(codes.device), n, c.block)
    if not bool(torch.isfinite(x).all()):
        raise ShardError("shard contains NaN or Inf")
    return x


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """codes x their block's scale (one multiply per value), without a full-length scale vector."""
    nb = scale.numel()
    full = codes.to(torch.float32)
    if nb * block != n:
        full = torch.cat([full, full.new_zeros(nb * block - n)])
    return (full.view(nb, block) * scale[:, None]).reshape(-1)[:n]


def roundtrip(x: torch.Tensor, c: BlockFormat) -> torch.Tensor:
    """decode(encode(x)) computed in place on x's device (what the wire does to x)."""
    if c.name == "fp32":
        return x.to(torch.float32)
    flat = x.reshape(-1).to(torch.float32)
    q, scale = _quantize(flat, c)
    return _dequantize(q, scale, flat.numel(), c.block).view_as(x)


def encoded_size(n: int, c: BlockFormat) -> int:
    """The exact byte length of encode() of any n-value vector under `c` (`spec.block_format`)."""
    return c.size(n)


def check_sizes(lengths: tuple[int, ...] = (1, 9, 257, 4099)) -> None:
    """RuntimeError when the exact sizes disagree with a real encode (another safetensors layout)."""
    for name in CODECS:
        for n in lengths:
            encode(torch.zeros(n), BlockCodec(name, 64))  # encode compares its length with the size


def blob_sha(blob: bytes) -> str:
    """Hex sha256 of a shard blob."""
    return hashlib.sha256(blob).hexdigest()

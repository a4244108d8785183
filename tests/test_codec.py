"""Wire codec: exact round trips, exact sizes, and every rejection with its own error class."""
import hashlib
import json
import struct

import pytest
import torch

from resbm import codec as C

SHAPES = [(7,), (3, 5), (2, 4, 8), (2, 3, 16, 8), (1, 1, 1)]
# Largest |decoded - x| relative to the per-vector absmax (scaled) or |x| (bf16).
TOL = {"fp32": 0.0, "bf16": 2.0**-8, "fp8": 2.0**-3, "int8": 0.5 / 127 + 1e-3}
BIG = 1 << 30


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 10


def _rehash(blob: bytes) -> bytes:
    body = blob[:-32]
    return body + hashlib.sha256(body).digest()


def _edit_header(blob: bytes, **changes) -> bytes:
    start = struct.calcsize("<4sH")
    hdr = json.loads(blob[start:start + C.HEADER_LEN])
    hdr.update(changes)
    raw = json.dumps(hdr, separators=(",", ":")).encode().ljust(C.HEADER_LEN, b" ")
    assert len(raw) == C.HEADER_LEN
    return _rehash(blob[:start] + raw + blob[start + C.HEADER_LEN:])


@pytest.mark.parametrize("codec", C.CODECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_equals_fake_quantize_and_is_within_bound(codec, shape):
    x = _x(shape)
    blob = C.encode(x, codec)
    assert len(blob) == C.wire_size(shape, codec)
    y = C.decode(blob, shape, codec, max_bytes=len(blob))
    assert y.dtype == torch.float32 and tuple(y.shape) == shape
    fq = C.fake_quantize(x, codec)
    assert fq.dtype == x.dtype
    assert torch.equal(y.view(torch.int32), fq.view(torch.int32)), "fake_quantize must be bit-exact"
    err = (y - x).abs()
    ref = x.abs() if codec in ("fp32", "bf16") else x.abs().amax(-1, keepdim=True).expand_as(x)
    assert bool((err <= TOL[codec] * ref + 1e-30).all()), f"max err {err.max()} for {codec}"
    if codec == "fp32":
        assert torch.equal(y, x)
    else:
        assert not torch.equal(y, x)  # the codec really quantises


def test_encoding_is_deterministic_and_decodes_from_bytearray():
    x = _x((4, 8))
    a, b = C.encode(x, "int8"), C.encode(x.clone(), "int8")
    assert a == b
    assert torch.equal(C.decode(bytearray(a), (4, 8), "int8", BIG), C.decode(memoryview(a), (4, 8), "int8", BIG))


def test_wire_size_formula_and_helpers():
    for codec in C.CODECS:
        n_scale = C.scale_bytes_per_vector(codec)
        assert C.wire_size((32, 512, 8), codec) == (
            C.overhead_bytes() + 32 * 512 * (8 * C.element_bytes(codec) + n_scale))
    assert [C.element_bytes(c) for c in C.CODECS] == [4, 2, 1, 1]
    assert [C.scale_bytes_per_vector(c) for c in C.CODECS] == [0, 0, 2, 2]
    with pytest.raises(C.CodecError, match="unknown codec 'fp16'"):
        C.wire_size((2, 2), "fp16")
    with pytest.raises(C.CodecError, match="dim"):
        C.wire_size((2, 0), "bf16")


def test_zero_vectors_and_tiny_gradients_survive_scaled_codecs():
    x = torch.zeros(3, 8)
    x[1] = 1e-30 * torch.arange(1, 9)  # gradient-sized values: bf16 scale must not underflow
    for codec in ("fp8", "int8"):
        y = C.decode(C.encode(x, codec), (3, 8), codec, BIG)
        assert torch.equal(y[0], torch.zeros(8)) and torch.equal(y[2], torch.zeros(8))
        assert torch.allclose(y[1], x[1], rtol=0.07, atol=0)


def test_fake_quantize_is_straight_through():
    for codec in C.CODECS:
        x = _x((2, 3, 8)).requires_grad_(True)
        w = torch.randn(2, 3, 8)
        (C.fake_quantize(x, codec) * w).sum().backward()
        assert torch.equal(x.grad, w)


def test_fake_quantize_grad_quantizes_only_the_gradient():
    x = _x((2, 3, 8)).requires_grad_(True)
    g = _x((2, 3, 8), seed=5)
    out = C.fake_quantize_grad(x, "int8")
    assert torch.equal(out, x)
    out.backward(g)
    assert torch.equal(x.grad, C.decode(C.encode(g, "int8"), (2, 3, 8), "int8", BIG))


def test_oversize_is_rejected_before_parsing():
    with pytest.raises(C.Oversized, match="exceeds max_bytes=10"):
        C.decode(b"\xff" * 11, (2, 2), "bf16", max_bytes=10)


@pytest.mark.parametrize("cut", [1, 32, 100, 5000])
def test_truncated(cut):
    blob = C.encode(_x((4, 64)), "fp8")
    with pytest.raises(C.Truncated):
        C.decode(blob[:-cut], (4, 64), "fp8", BIG)


def test_appended_bytes_rejected():
    blob = C.encode(_x((4, 8)), "bf16")
    with pytest.raises(C.Oversized, match=f"expected exactly {len(blob)}"):
        C.decode(blob + b"\x00", (4, 8), "bf16", BIG)


@pytest.mark.parametrize("codec", C.CODECS)
def test_flipped_payload_byte_is_hash_mismatch(codec):
    blob = bytearray(C.encode(_x((4, 8)), codec))
    blob[C.overhead_bytes() - 32 + 5] ^= 0x01
    with pytest.raises(C.HashMismatch):
        C.decode(bytes(blob), (4, 8), codec, BIG)
    blob = bytearray(C.encode(_x((4, 8)), codec))
    blob[-1] ^= 0x80  # the digest itself
    with pytest.raises(C.HashMismatch):
        C.decode(bytes(blob), (4, 8), codec, BIG)


def test_header_shape_edit_is_shape_mismatch():
    blob = C.encode(_x((4, 8)), "bf16")
    with pytest.raises(C.ShapeMismatch, match=r"shape \(8, 4\) in header, expected \(4, 8\)"):
        C.decode(_edit_header(blob, shape=[8, 4]), (4, 8), "bf16", BIG)
    with pytest.raises(C.ShapeMismatch):
        C.decode(blob, (2, 16), "bf16", BIG)


def test_codec_and_dtype_mismatch():
    blob = C.encode(_x((4, 8)), "bf16")
    with pytest.raises(C.DtypeMismatch, match="codec 'bf16' in header, expected 'fp32'"):
        C.decode(blob, (4, 8), "fp32", BIG)
    with pytest.raises(C.DtypeMismatch, match="dtype"):
        C.decode(_edit_header(blob, dtype="float16"), (4, 8), "bf16", BIG)
    with pytest.raises(C.DtypeMismatch, match="codec 'int8' in header"):
        C.decode(_edit_header(C.encode(_x((4, 8)), "fp8"), codec="int8"), (4, 8), "fp8", BIG)
    with pytest.raises(C.DtypeMismatch):
        C.decode(_edit_header(C.encode(_x((4, 8)), "fp8"), scale_dtype="float32"), (4, 8), "fp8", BIG)


def test_unknown_version_in_prefix_and_header():
    blob = C.encode(_x((4, 8)), "int8")
    bumped = blob[:4] + struct.pack("<H", C.FORMAT_VERSION + 1) + blob[6:]
    with pytest.raises(C.UnknownVersion, match="format version 2"):
        C.decode(_rehash(bumped), (4, 8), "int8", BIG)
    with pytest.raises(C.UnknownVersion):
        C.decode(_edit_header(blob, v=7), (4, 8), "int8", BIG)


@pytest.mark.parametrize("bad_header", [
    b"not json", b"[1,2]", b'{"v":1}', b'{"v":1,"dtype":"bfloat16","shape":[4,8],"codec":"bf16",'
    b'"scale_dtype":null,"extra":1}', b'{"v":1,"dtype":"bfloat16","shape":[4,-8],"codec":"bf16",'
    b'"scale_dtype":null}', b'{"v":NaN,"dtype":"bfloat16","shape":[4,8],"codec":"bf16","scale_dtype":null}',
    b'{"v":"1","dtype":"bfloat16","shape":[4,8],"codec":"bf16","scale_dtype":null}', b"\xff\xfe",
])
def test_malformed_header(bad_header):
    blob = C.encode(_x((4, 8)), "bf16")
    start = struct.calcsize("<4sH")
    forged = _rehash(blob[:start] + bad_header.ljust(C.HEADER_LEN, b" ") + blob[start + C.HEADER_LEN:])
    with pytest.raises(C.MalformedHeader):
        C.decode(forged, (4, 8), "bf16", BIG)
    with pytest.raises(C.MalformedHeader, match="bad magic"):
        C.decode(b"XXXX" + blob[4:], (4, 8), "bf16", BIG)


@pytest.mark.parametrize("codec", C.CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_refused(codec, bad):
    x = _x((3, 8))
    x[1, 2] = bad
    with pytest.raises(C.NonFinite):
        C.encode(x, codec)


def test_bf16_overflow_refused():
    with pytest.raises(C.NonFinite, match="bfloat16 range"):
        C.encode(torch.full((2, 2), 3.4e38), "bf16")


@pytest.mark.parametrize("codec,target", [("fp32", "values"), ("bf16", "values"),
                                          ("fp8", "values"), ("int8", "scales"), ("fp8", "scales")])
def test_non_finite_payload_rejected_even_with_valid_hash(codec, target):
    shape = (2, 8)
    blob = bytearray(C.encode(_x(shape), codec))
    n_scale = 2 * C.scale_bytes_per_vector(codec)
    at = C.overhead_bytes() - 32 + (0 if target == "scales" else n_scale)
    nan = {"fp32": b"\x00\x00\xc0\x7f", "bf16": b"\xc0\x7f", "fp8": b"\x7f"}
    patch = b"\xc0\x7f" if target == "scales" else nan[codec]
    blob[at:at + len(patch)] = patch
    with pytest.raises(C.NonFinite):
        C.decode(_rehash(bytes(blob)), shape, codec, BIG)


def test_bad_arguments_named():
    with pytest.raises(C.CodecError, match="floating-point"):
        C.encode(torch.arange(4), "bf16")
    with pytest.raises(C.CodecError, match="needs bytes"):
        C.decode("text", (2,), "bf16", BIG)
    with pytest.raises(C.CodecError, match="unknown codec"):
        C.fake_quantize(torch.zeros(2), "fp4")


@pytest.mark.parametrize("codec", C.CODECS)
@pytest.mark.parametrize("magnitude", [1e-12, 1e-3, 1.0, 1e6])
def test_quantisation_is_idempotent_so_emitted_codes_survive_the_wire(codec, magnitude):
    # A stage emits fake_quantize(h); the miner encodes that again: it must arrive unchanged.
    q = C.fake_quantize(_x((4, 16, 8), seed=3) * magnitude, codec)
    again = C.decode(C.encode(q, codec), q.shape, codec, BIG)
    assert torch.equal(again.view(torch.int32), q.view(torch.int32))


@pytest.mark.parametrize("codec", ["fp8", "int8"])
def test_scaled_codecs_handle_float32_max(codec):
    x = torch.zeros(2, 4)
    x[1, 0], x[1, 1] = torch.finfo(torch.float32).max, -1e30
    y = C.decode(C.encode(x, codec), (2, 4), codec, BIG)
    assert torch.isfinite(y).all() and torch.equal(y, C.fake_quantize(x, codec))
    assert abs(y[1, 0].item() / x[1, 0].item() - 1) < 0.01 and torch.equal(y[0], torch.zeros(4))


def test_every_fp8_code_decodes_like_torch_cast():
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.int32).to(torch.uint8)
    shape = (1, codes.numel())
    blob = bytearray(C.encode(torch.ones(shape), "fp8"))
    at = C.overhead_bytes() - 32
    blob[at:at + 2] = torch.tensor([1.0]).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    blob[at + 2:at + 2 + codes.numel()] = codes.numpy().tobytes()
    y = C.decode(_rehash(bytes(blob)), shape, "fp8", BIG)
    want = codes.view(torch.float8_e4m3fn).float().reshape(shape)
    assert torch.equal(y.view(torch.int32), want.view(torch.int32))

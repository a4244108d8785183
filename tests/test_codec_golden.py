"""Wire bytes of both codec families, pinned: the activation codec (resbm.codec: codes and their
gradients between stages) and the sync codec (resbm.sync_codec: pseudo-gradient pieces and merged
updates). The inputs are exact binary fractions built without a random generator, so the bytes
are the same on every machine and torch version; a refactor that changes one byte fails here.
The hashes were taken before the codecs moved onto one base (issue 23)."""
from __future__ import annotations

import hashlib

import pytest
import torch

from resbm import codec, sync_codec
from resbm.sync_state import pack_update


def exact_values(n: int) -> torch.Tensor:
    """n exactly representable values with mixed signs, magnitudes and a few exact zeros."""
    i = torch.arange(n, dtype=torch.float64)
    v = ((i * 37) % 101 - 50) / 16 * torch.pow(2.0, (i % 7) - 3)
    return v.to(torch.float32)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def values_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


ACTIVATION = {  # codec -> (encoded length, sha256, sha256[:16] of the decoded float32 values)
    "fp32": (870, "478db4e9ab6fb173c7145f25bc8b49bf2626ecceacada3d4e7b85e8e3ec03b8d", "194f11bb8fa06f73"),
    "bf16": (582, "e64574cefc2a699bc74ed8992c6ffa16d9b7249a15769d4649574626dfc07a7d", "194f11bb8fa06f73"),
    "fp8": (450, "ee917ac3c9f4a775eb286adab042aa7a76c721ac88ae5675f826b6436d409d86", "7e1177b6e2928d6f"),
    "int8": (450, "88a3fdcd6e1d0366ddfdfec1f02a361a38ddb1bcc456192462477cdb333098ca", "d59ab7109500a380"),
}

SYNC = {  # codec -> (encoded length, sha256, sha256[:16] of the decoded values) of 1000 values, block 64
    "fp32": (4152, "7bd042d3f188b7609ff96e4137f174ac726423f23b8dfa0ccd464bc7173b28d7", "a334e8f2c935ff3d"),
    "int8": (1272, "8c1422b62ae18c140db81a4b5d9b502213ac7915d28f5840653ac635ae07b296", "87b4b20d02df8c17"),
    "int4": (764, "45c27e024c1a7a5e27cf4c159d68a57f12b6c2807aa1b3f17a6480771fc7996f", "91427ad52a9802af"),
    "int2": (514, "b9960578a98ea3522b67ca4b87baef35216acdf84b939df7242b3e7b16d1c030", "d35ba3d68a0b90e0"),
}

MERGED = {  # codec -> (length, sha256) of a merged update: clip reference 0.75, then the vector
    "fp32": (4156, "535efa5842997f35dd623ec74c791d08ea75ee1bcff077e67a6b7f5f8952ad79"),
    "int8": (1276, "900510b462e55ca3cde4e254b46ac5f0c3ad904f501fdfaad86503ebf4c8af1b"),
}


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp8", "int8"])
def test_activation_codec_bytes_are_pinned(name):
    x = exact_values(2 * 3 * 24).reshape(2, 3, 24)
    blob = codec.encode(x, name)
    size, sha, decoded = ACTIVATION[name]
    assert (len(blob), digest(blob)) == (size, sha)
    assert codec.wire_size((2, 3, 24), name) == size
    assert values_digest(codec.decode(blob, (2, 3, 24), name, max_bytes=size)) == decoded


@pytest.mark.parametrize("name", ["fp32", "int8", "int4", "int2"])
def test_sync_codec_bytes_are_pinned(name):
    c = sync_codec.Codec(name, 64)
    blob = sync_codec.encode(exact_values(1000), c)
    size, sha, decoded = SYNC[name]
    assert (len(blob), digest(blob)) == (size, sha)
    assert sync_codec.encoded_size(1000, c) == size
    assert values_digest(sync_codec.decode(blob, 1000, c)) == decoded


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_merged_update_bytes_are_pinned(name):
    blob = pack_update(exact_values(1000), 0.75, sync_codec.Codec(name, 64))
    assert (len(blob), digest(blob)) == MERGED[name]

"""Deterministic offline data: pure sample-id batches, disjoint validation split, verified assets."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resbm import data
from scripts.prepare_data import split_documents

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "resbm" / "assets"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_same_seed_and_id_give_same_batch_and_shapes():
    a_tok, a_tgt = data.batch(7, 123, 4, 64)
    b_tok, b_tgt = data.batch(7, 123, 4, 64)
    assert a_tok.dtype == torch.int64 and a_tgt.dtype == torch.int64
    assert a_tok.shape == a_tgt.shape == (4, 64)
    assert torch.equal(a_tok, b_tok) and torch.equal(a_tgt, b_tgt)
    assert len({_digest(r) for r in a_tok}) == 4  # rows are different windows


def test_same_batch_in_a_fresh_process():
    code = ("import hashlib,sys; from resbm import data; t, y = data.batch(7, 123, 4, 64); "
            "sys.stdout.write(hashlib.sha256(t.numpy().tobytes() + y.numpy().tobytes()).hexdigest())")
    env = {k: v for k, v in os.environ.items() if k != data.DATA_DIR_ENV}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    tok, tgt = data.batch(7, 123, 4, 64)
    assert out == hashlib.sha256(tok.numpy().tobytes() + tgt.numpy().tobytes()).hexdigest()


def test_ids_seeds_and_splits_change_the_batch():
    base = data.batch(1, 0, 8, 32)[0]
    assert not torch.equal(base, data.batch(1, 1, 8, 32)[0])
    assert not torch.equal(base, data.batch(2, 0, 8, 32)[0])
    assert not torch.equal(base, data.batch(1, 0, 8, 32, split="val")[0])
    # a larger batch extends the smaller one: row r depends only on (seed, id, row)
    assert torch.equal(data.batch(1, 0, 16, 32)[0][:8], base)


def test_targets_are_tokens_shifted_by_one_window_of_the_stream():
    tok, tgt = data.batch(3, 99, 6, 48)
    assert torch.equal(tok[:, 1:], tgt[:, :-1])
    train = data.load().tokens("train")
    blob = np.ascontiguousarray(train).tobytes()
    for row_tok, row_tgt in zip(tok, tgt):
        at = blob.find(row_tok.numpy().astype(np.uint16).tobytes())
        assert at >= 0 and at % 2 == 0
        o = at // 2
        assert np.array_equal(train[o + 1:o + 49], row_tgt.numpy())


def _doc_bounds(td, split):
    """Document start offsets (with the total appended): every document ends with the EOT id."""
    arr = td.tokens(split)
    ends = np.flatnonzero(np.asarray(arr) == td.manifest.eot_id) + 1
    return np.concatenate([[0], ends])


def test_vocab_bounds_and_manifest():
    td = data.load()
    assert td.vocab_size == data.VOCAB_SIZE and td.manifest.format == 2
    for split in data.SPLITS:
        arr = td.tokens(split)
        assert arr.dtype == np.uint16 and int(arr.max()) < data.VOCAB_SIZE
        assert td.manifest.split_tokens(split) == arr.size == td.manifest.info["splits"][split]["tokens"]
    tok, tgt = data.batch(11, 5, 16, 128)
    assert int(tok.min()) >= 0 and int(tok.max()) < data.VOCAB_SIZE
    assert int(tgt.max()) < data.VOCAB_SIZE
    for split in data.SPLITS:  # the EOT separator closes every document
        assert td.tokens(split)[-1] == td.manifest.eot_id


def test_validation_split_is_disjoint_from_training():
    td = data.load()
    docs = td.manifest.info["documents"]
    train_docs, val_docs = set(docs["train"]), set(docs["val"])
    assert val_docs and not (train_docs & val_docs)
    for split in data.SPLITS:
        assert len(_doc_bounds(td, split)) == len(docs[split]) + 1
    frac = td.tokens("val").size / (td.tokens("val").size + td.tokens("train").size)
    assert 0.02 <= frac <= 0.06
    train_bytes = np.ascontiguousarray(td.tokens("train")).tobytes()
    for tok, _ in data.validation_batches(2, 4, 128):
        for row in tok:
            assert train_bytes.find(row.numpy().astype(np.uint16).tobytes()) < 0


def test_validation_batches_are_fixed_and_from_the_val_split():
    a = data.validation_batches(3, 4, 64)
    b = data.validation_batches(3, 4, 64)
    assert len(a) == 3
    for (ta, ya), (tb, yb) in zip(a, b):
        assert ta.shape == (4, 64) and torch.equal(ta, tb) and torch.equal(ya, yb)
        assert torch.equal(ta[:, 1:], ya[:, :-1])
    val = data.load().tokens("val")
    first = a[0][0][0].numpy()
    assert np.array_equal(val[:64], first)  # evenly spaced windows start at the split's start
    last = a[-1][0][-1].numpy()
    assert np.array_equal(val[val.size - 65:val.size - 1], last)


@pytest.mark.parametrize("kwargs,match", [
    (dict(run_seed=-1), "run_seed"), (dict(sample_id=-5), "sample_id"),
    (dict(sample_id=2**64), "sample_id"), (dict(sample_id=1.0), "sample_id must be an int"),
    (dict(batch_size=0), "batch_size"), (dict(seq_len=0), "seq_len"),
    (dict(seq_len=10**9), "seq_len"), (dict(split="test"), "split"), (dict(run_seed=True), "run_seed"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(run_seed=1, sample_id=2, batch_size=2, seq_len=16, split="train") | kwargs
    with pytest.raises(data.DataError, match=match):
        data.batch(**args)


def test_seq_len_beyond_the_val_split_is_refused():
    n = data.load().tokens("val").size
    with pytest.raises(data.DataError, match=f"seq_len {n} is too long"):
        data.validation_batches(1, 1, n)
    assert data.validation_batches(1, 1, n - 1)[0][0].shape == (1, n - 1)


@pytest.fixture()
def asset_copy(tmp_path):
    dst = tmp_path / "assets"
    shutil.copytree(ASSETS, dst, ignore=shutil.ignore_patterns("tmp*"))
    return dst


def test_manifest_hash_catches_a_corrupted_file(asset_copy, monkeypatch):
    assert torch.equal(data.batch(1, 2, 2, 16, data_dir=asset_copy)[0], data.batch(1, 2, 2, 16)[0])
    for split in data.SPLITS:  # shards are verified when first read: corrupt one of each split
        victim = asset_copy / f"{split}-00000.npy"
        raw = bytearray(victim.read_bytes())
        raw[-3] ^= 0x01  # same size, one token changed
        victim.write_bytes(bytes(raw))
    corrupted = asset_copy.parent / "corrupted"
    asset_copy.rename(corrupted)  # a fresh folder path: nothing cached for it
    monkeypatch.setenv(data.DATA_DIR_ENV, str(corrupted))
    assert data.default_data_dir() == corrupted
    with pytest.raises(data.DataError, match="train-00000.npy: sha256"):
        data.batch(1, 2, 2, 16)
    with pytest.raises(data.DataError, match="val-00000.npy: sha256"):
        data.validation_batches(1, 2, 16, data_dir=corrupted)


def test_missing_or_bad_manifest_and_missing_file(asset_copy):
    (asset_copy / "train-00000.npy").unlink()
    with pytest.raises(data.DataError, match="train-00000.npy.*missing"):
        data.batch(0, 0, 1, 8, data_dir=asset_copy)
    with pytest.raises(data.DataError, match="no manifest.json"):
        data.batch(0, 0, 1, 8, data_dir=asset_copy / "nowhere")
    bad = asset_copy.parent / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": 1, "files": {}}))
    with pytest.raises(data.DataError, match="format 1.*prepare_dataset.py"):
        data.batch(0, 0, 1, 8, data_dir=bad)
    worse = asset_copy.parent / "worse"
    worse.mkdir()
    (worse / "manifest.json").write_text(json.dumps({"format": 2, "name": "x"}))
    with pytest.raises(data.DataError, match="vocab_size: Field required"):
        data.batch(0, 0, 1, 8, data_dir=worse)


def test_decode_tokens_round_trips_a_validation_document():
    from tokenizers import Tokenizer

    td = data.load()
    offs = _doc_bounds(td, "val")
    i = int(np.argmin(np.diff(offs)))
    ids = np.asarray(td.tokens("val")[offs[i]:offs[i + 1] - 1], dtype=np.int64)  # drop the EOT
    text = data.decode_tokens(torch.from_numpy(ids))
    assert len(text) > 100 and " the " in text
    tok = Tokenizer.from_file(str(td.file_path("tokenizer.json")))
    assert tok.encode(text).ids == ids.tolist()
    with pytest.raises(data.DataError, match="token ids"):
        data.decode_tokens([1, data.VOCAB_SIZE])


def test_split_documents_is_deterministic_and_by_fraction():
    docs = [(f"src/doc{i}", "x" * (100 + i)) for i in range(200)]
    held = split_documents(docs, 0.05)
    assert held == split_documents(list(reversed(docs)), 0.05)
    chars = sum(len(t) for d, t in docs if d in held)
    total = sum(len(t) for _, t in docs)
    assert 0.05 * total <= chars < 0.05 * total + 300
    assert held != split_documents(docs, 0.2) and held < split_documents(docs, 0.2)

"""Held-out evaluation (resbm.evaluate): loss, perplexity and bits per byte against figures worked
out by hand, byte counts against the tokenizer's own decoding, and windows that do not depend on
how they are batched (so validators, the report and the reference trainer see the same tokens)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from resbm import data
from resbm.evaluate import evaluate_lm, held_out_batches, token_byte_lengths

V = data.VOCAB_SIZE


@pytest.fixture(scope="module")
def ds():
    return data.load()


@pytest.fixture(scope="module")
def lengths(ds):
    return token_byte_lengths(ds.file_path(ds.manifest.tokenizer.name), V)


def test_byte_counts_match_the_tokenizers_decoding(ds, lengths):
    tok = Tokenizer.from_file(str(ds.file_path(ds.manifest.tokenizer.name)))
    ids = np.asarray(ds.tokens("val")[:20_000]).astype(np.int64)
    plain = [int(i) for i in ids if i != ds.manifest.eot_id]
    assert len(plain) < len(ids), "the slice should hold an end-of-text token"
    assert int(lengths[plain].sum()) == len(tok.decode(plain).encode("utf-8"))
    assert lengths[ds.manifest.eot_id] == 0  # a special token stands for no text
    assert int(lengths[ids].sum()) == len(tok.decode(plain).encode("utf-8"))


def test_a_uniform_model_scores_log_vocab_and_bits_per_byte_follow(ds, lengths):
    batches = held_out_batches(ds, 500, 16)
    r = evaluate_lm(lambda t: torch.zeros(*t.shape, V), batches, lengths)
    assert r.tokens == 512  # 500 tokens -> 32 whole windows of 16
    assert r.loss == pytest.approx(math.log(V), rel=1e-6)
    assert r.perplexity == pytest.approx(V, rel=1e-5)
    nbytes = sum(int(lengths[y.reshape(-1).numpy()].sum()) for _, y in batches)
    assert r.bytes == nbytes and r.bits_per_byte == pytest.approx(512 * math.log2(V) / nbytes, rel=1e-6)
    assert evaluate_lm(lambda t: torch.zeros(*t.shape, V), batches).bits_per_byte is None


def test_the_loss_is_the_mean_cross_entropy_over_every_target(ds):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=g)  # a bigram "model": logits are a row per input token
    batches = held_out_batches(ds, 300, 16, batch=7)
    r = evaluate_lm(lambda t: table[t], batches)
    toks = torch.cat([x.reshape(-1) for x, _ in batches])
    tgts = torch.cat([y.reshape(-1) for _, y in batches])
    want = torch.nn.functional.cross_entropy(table[toks], tgts).item()
    assert r.loss == pytest.approx(want, rel=1e-5) and r.tokens == tgts.numel()
    with pytest.raises(ValueError, match="not finite"):
        evaluate_lm(lambda t: torch.full((*t.shape, V), float("nan")), batches)


def test_windows_depend_only_on_their_count_not_on_the_batching(ds):
    a = held_out_batches(ds, 40 * 16, 16, batch=32)
    b = held_out_batches(ds, 40 * 16, 16, batch=3)
    assert [x.shape[0] for x, _ in a] == [32, 8] and len(b) == 14
    assert torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b]))
    # the reference trainer's validation_batches(n, B, T) hold the same n x B windows
    ref = ds.validation_batches(10, 4, 16)
    assert torch.equal(torch.cat([x for x, _ in ref]), torch.cat([x for x, _ in a]))
    assert torch.equal(torch.cat([y for _, y in ref]), torch.cat([y for _, y in a]))

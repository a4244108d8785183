"""Per-shard votes: every merger agreeing decides; any dissent waits for a validator's
recomputation, so neither a lone liar nor a colluding majority decides against an honest merger;
the validator's shard check fails exactly the liar."""
from __future__ import annotations

import hashlib

import pytest

from bridge.records import TransitionError
from bridge.shard_votes import (KEEP_SHA, arbitrate, complete, new_ballot, on_time, open_disputes,
                                update_refs, vote)
from protocol.errors import http_status

HKS = ["a", "b", "c", "d", "e"]
ARB = 30.0


def ballot(mergers=3, shards=4):
    return new_ballot(7, 1, HKS, shards, mergers, now=0.0, vote_timeout=10.0)


def test_every_merger_agreeing_decides_and_any_dissent_is_a_dispute():
    b = ballot()
    hs = b.mergers[0]
    assert vote(b, hs[0], 0, "good", "k0", 5, 1.0, ARB) is None
    assert vote(b, hs[2], 0, "good", "k2", 5, 1.0, ARB) is None  # 2 of 3: waits for the third
    assert vote(b, hs[1], 0, "good", "k1", 5, 1.0, ARB) is True
    assert b.decided[0] == {"sha256": "good", "key": "k0", "size": 5, "alt_keys": ["k1", "k2"]}
    assert b.flagged == []
    hs = b.mergers[1]  # a liar among three, or two colluders against one: the same dispute
    vote(b, hs[0], 1, "evil", "k0", 5, 1.0, ARB)
    vote(b, hs[1], 1, "evil", "k1", 5, 1.0, ARB)
    assert vote(b, hs[2], 1, "good", "k2", 5, 1.0, ARB) is None
    assert 1 not in b.decided and [d["shard"] for d in open_disputes(b)] == [1]
    assert arbitrate(b, 1, "good") is True
    assert b.decided[1]["key"] == "k2" and sorted(b.flagged) == sorted(hs[:2])
    assert vote(b, hs[1], 1, "evil", "k1", 5, 2.0, ARB) is False  # repeat: told it lost


def test_a_split_is_a_dispute_only_a_validator_settles():
    b = ballot(mergers=2)
    x, y = b.mergers[2]
    vote(b, x, 2, "good", "kx", 5, 1.0, ARB)
    vote(b, y, 2, "evil", "ky", 5, 1.0, ARB)
    assert 2 not in b.decided and [d["shard"] for d in open_disputes(b)] == [2]
    assert arbitrate(b, 2, "good") is True
    assert b.decided[2]["key"] == "kx" and b.flagged == [y]
    with pytest.raises(TransitionError) as e:
        arbitrate(b, 2, "good")
    assert http_status(e.value.code) == 409


def test_no_agreeing_voter_or_no_validator_keeps_the_shard():
    b = ballot(mergers=2)
    x, y = b.mergers[1]
    vote(b, x, 1, "one", "kx", 5, 1.0, ARB)
    vote(b, y, 1, "two", "ky", 5, 1.0, ARB)
    assert arbitrate(b, 1, "three") is False and b.decided[1] is None
    b2 = ballot(mergers=2)
    x, y = b2.mergers[0]
    vote(b2, x, 0, "one", "kx", 5, 1.0, ARB)
    vote(b2, y, 0, "two", "ky", 5, 1.0, ARB)
    on_time(b2, 1.0 + ARB - 0.1, ARB)
    assert 0 not in b2.decided
    on_time(b2, 1.0 + ARB, ARB)
    assert b2.decided[0] is None


def test_vote_timeout_opens_disputes_and_silence_keeps():
    b = ballot()
    hs = b.mergers[3]
    vote(b, hs[0], 3, "good", "k", 5, 1.0, ARB)  # one of three: no majority yet
    on_time(b, 10.0, ARB)
    assert 3 in b.disputes and b.decided[0] is None  # shard 0: nobody voted -> kept
    assert not complete(b)
    with pytest.raises(TransitionError):
        update_refs(b)


def test_keep_votes_and_completion():
    b = ballot(shards=2)
    for s in range(2):
        for h in b.mergers[s]:
            vote(b, h, s, KEEP_SHA if s == 0 else "upd", f"k{h}", 0, 1.0, ARB)
    assert complete(b)
    refs = update_refs(b)
    assert refs[0] is None and refs[1]["sha256"] == "upd"


def test_only_assigned_mergers_vote_and_votes_do_not_change():
    b = ballot()
    outsider = next(h for h in HKS if h not in b.mergers[0])
    with pytest.raises(TransitionError) as e:
        vote(b, outsider, 0, "x", "k", 1, 1.0, ARB)
    assert http_status(e.value.code) == 409 and e.value.code == "not_a_merger"
    with pytest.raises(TransitionError) as e:
        vote(b, b.mergers[0][0], 99, "x", "k", 1, 1.0, ARB)
    assert http_status(e.value.code) == 400
    vote(b, b.mergers[0][0], 0, "x", "k", 1, 1.0, ARB)
    with pytest.raises(TransitionError) as e:
        vote(b, b.mergers[0][0], 0, "y", "k", 1, 1.0, ARB)
    assert e.value.code == "already_voted"


def test_validator_recomputes_a_shard_and_fails_exactly_the_liar(s3_server):
    import torch

    from neurons.shard_check import judge_shard, recompute_shard
    from neurons.shard_sync import Piece, ReplicaSync, pg_key
    from neurons.transfer import ObjectTransfer
    from resbm.shards import assign_mergers
    from tests.harness.shard_board import CFG, SHAPES, StorageBoard, tensors

    storage = s3_server.storage()
    board = StorageBoard(storage)
    lay = CFG.layout(SHAPES)
    hks = ["v0", "v1", "v2", "v3"]
    syncs = {h: ReplicaSync(ObjectTransfer(), board, CFG, "vchk", h, 0) for h in hks}
    pgs = {h: tensors(20 + i) for i, h in enumerate(hks)}
    pieces = [Piece(h, 10, syncs[h].upload(2, pgs[h], lay)) for h in hks]
    # v3 reports, for shard 0, bytes that are not a shard object: its sender is failed
    garbage = b"not safetensors at all"
    gsha = hashlib.sha256(garbage).hexdigest()
    storage.put(pg_key("vchk", 2, 0, "v3", 0, gsha), garbage)
    pieces[3] = Piece("v3", 10, (gsha,) + pieces[3].shas[1:])
    table = assign_mergers(2, 0, hks, len(lay), CFG.mergers)
    s = 0
    votes = {h: syncs[h].merge_one(2, s, lay[s], pieces, None).sha for h in table[s]}
    liar = table[s][0]
    votes[liar] = "f" * 64
    val = ReplicaSync(ObjectTransfer(), board, CFG, "vchk", "validator", 0)
    out = recompute_shard(val, 2, s, lay[s], pieces, None)
    verdict = judge_shard(out, votes)
    assert set(verdict.agreed) == set(table[s]) - {liar}
    assert liar in verdict.failed and "differs from the recomputation" in verdict.failed[liar]
    assert "v3" in verdict.failed and "pseudo-gradient unusable" in verdict.failed["v3"]
    assert torch.is_tensor(out.update)

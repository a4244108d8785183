"""The sharded sync over a real rclone S3 with the bridge's own signer: replicas end bit-identical,
one liar per shard is outvoted, a corrupt piece is left out, bytes per replica stay flat in R."""
from __future__ import annotations

import hashlib
import uuid

import pytest
import torch

from neurons.shard_sync import Piece, ReplicaSync, pg_key, read_update, strict_majority
from neurons.transfer import ObjectTransfer, TransferError
from resbm.shard_merge import zero_momentum
from resbm.shards import assign_mergers, take
from resbm.sync_codec import decode, encode
from resbm.sync_state import pack_update
from tests.harness.shard_board import CFG, SHAPES, StorageBoard, tensors



def run_round(board, rnd, hks, theta0, pgs, liar=None, corrupt=None, storage=None):
    """One round for every replica; returns (theta per replica, transfer per replica, decided)."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    lay = CFG.layout(SHAPES)
    xfer = {h: ObjectTransfer() for h in hks}
    syncs = {h: ReplicaSync(xfer[h], board, CFG, prefix, h, 0) for h in hks}
    pieces = [Piece(h, 10, syncs[h].upload(rnd, pgs[h], lay)) for h in hks]
    if corrupt is not None:  # overwrite one shard of one replica with other bytes: hash mismatch
        key = pg_key(prefix, rnd, 0, corrupt, 1, pieces[hks.index(corrupt)].shas[1])
        storage.put(key, b"not the reported bytes")
    table = assign_mergers(rnd, 0, hks, len(lay), CFG.mergers)
    merged = {h: syncs[h].merge(rnd, table, lay, pieces, [None] * len(lay)) for h in hks}
    if liar is not None:
        for s, ms in merged[liar].items():
            ms.sha = hashlib.sha256(b"lie").hexdigest()
    decided = []
    for s, mergers in enumerate(table):
        sha = strict_majority({h: merged[h][s].sha for h in mergers}, mergers)
        holder = next(h for h in mergers if merged[h][s].sha == sha)
        decided.append(([board.get_url(merged[holder][s].key)], sha))
    thetas = {}
    for h in hks:
        th = {n: t.clone() for n, t in theta0.items()}
        mo = zero_momentum(th)
        syncs[h].apply(rnd, th, mo, lay, decided, merged[h])
        thetas[h] = th
    return thetas, xfer, merged, table


def test_replicas_agree_liars_are_outvoted_and_corrupt_pieces_left_out(s3_server):
    storage = s3_server.storage()
    board = StorageBoard(storage)
    hks = [f"hk{i}" for i in range(5)]
    theta0 = tensors(1)
    base = tensors(2)
    pgs = {h: {n: base[n] + 0.2 * t for n, t in tensors(10 + i).items()} for i, h in enumerate(hks)}
    honest, _, merged_h, _ = run_round(board, 3, hks, theta0, pgs)
    ref = honest[hks[0]]
    assert all(torch.equal(honest[h][n], ref[n]) for h in hks for n in SHAPES)
    assert any(not torch.equal(ref[n], theta0[n]) for n in SHAPES)
    # one liar among 3 mergers per shard cannot change what is applied
    lied, _, _, _ = run_round(board, 3, hks, theta0, pgs, liar=hks[2])
    assert all(torch.equal(lied[h][n], ref[n]) for h in hks for n in SHAPES)
    # a piece whose bytes do not match its reported sha is left out, and named, by every merger
    bad, _, merged_b, table = run_round(board, 3, hks, theta0, pgs, corrupt=hks[4], storage=storage)
    for h in table[1]:
        assert "hash mismatch" in merged_b[h][1].excluded[hks[4]]
    assert all(torch.equal(bad[h][n], bad[hks[0]][n]) for h in hks for n in SHAPES)


def test_bytes_per_replica_do_not_grow_with_r(s3_server):
    board = StorageBoard(s3_server.storage())
    theta0 = tensors(1)
    worst = {}
    for r in (3, 9):
        hks = [f"r{r}h{i}" for i in range(r)]
        pgs = {h: tensors(50 + i, 0.1) for i, h in enumerate(hks)}
        _, xfer, _, _ = run_round(board, 1, hks, theta0, pgs)
        worst[r] = max(x.stats.bytes_down + x.stats.bytes_up for x in xfer.values())
    p_fp32 = 4 * sum(t.numel() for t in theta0.values())
    assert worst[9] < 1.6 * worst[3]  # flat-ish: shards spread over more mergers
    assert worst[9] < 0.3 * (9 + 2) * p_fp32  # well below today's (R + 2) x 4P


def test_a_sole_replica_merges_from_memory_and_agrees_with_a_recomputation_from_the_store(s3_server):
    board = StorageBoard(s3_server.storage())
    prefix, lay = f"t{uuid.uuid4().hex[:8]}", CFG.layout(SHAPES)
    solo = ReplicaSync(ObjectTransfer(), board, CFG, prefix, "solo", 0)
    pieces = [Piece("solo", 10, solo.upload(2, tensors(70, 0.1), lay))]
    merged = solo.merge(2, [["solo"]] * len(lay), lay, pieces, [None] * len(lay))
    assert len(merged) == len(lay) and solo.transfer.stats.bytes_down == 0  # its pieces never came back down
    checker = ReplicaSync(ObjectTransfer(), board, CFG, prefix, "validator", 0)
    for s, ms in merged.items():  # a validator's recomputation reads the stored pieces
        assert checker.merge_one(2, s, lay[s], pieces, None, upload=False).sha == ms.sha
    assert checker.transfer.stats.bytes_down > 0


def test_oversized_truncated_undecodable_and_malformed_pieces_are_left_out_alike(s3_server):
    """Pieces that are a property of their sender's object (too large for the shard's exact size,
    truncated, garbage of the right size, a report missing a shard) are screened like a hash
    mismatch: every merger of the shard leaves out the same sender, names why, and still merges."""
    storage = s3_server.storage()
    board = StorageBoard(storage)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    lay = CFG.layout(SHAPES)
    hks = [f"hk{i}" for i in range(5)]
    syncs = {h: ReplicaSync(ObjectTransfer(), board, CFG, prefix, h, 0) for h in hks}
    base = tensors(2)
    pieces = {h: Piece(h, 10, syncs[h].upload(2, {n: base[n] + 0.2 * t for n, t in tensors(20 + i).items()}, lay))
              for i, h in enumerate(hks)}

    def replace(h, s, blob):  # the sender reports the sha256 of what it stored: only the bytes are wrong
        shas = list(pieces[h].shas)
        shas[s] = hashlib.sha256(blob).hexdigest()
        storage.put(pg_key(prefix, 2, 0, h, s, shas[s]), blob)
        pieces[h] = Piece(h, 10, tuple(shas))
    exact = len(encode(take(base, *lay[0]), CFG.pg))
    replace("hk1", 0, b"\0" * (exact + 4096))                     # a few KiB too large
    good = storage.get(pg_key(prefix, 2, 0, "hk2", 1, pieces["hk2"].shas[1]), 10**7)
    replace("hk2", 1, good[:-9])                                   # truncated
    replace("hk3", 2, bytes(len(good)))                             # the right size, garbage
    pieces["hk4"] = Piece("hk4", 10, pieces["hk4"].shas[:3])        # a report without shards 3..
    want = {0: ("hk1", "oversized"), 1: ("hk2", "undecodable"), 2: ("hk3", "undecodable"),
            4: ("hk4", "malformed report")}
    table = assign_mergers(2, 0, hks, len(lay), CFG.mergers)
    items = [pieces[h] for h in hks]
    for s, (who, why) in want.items():
        outs = [syncs[h].merge_one(2, s, lay[s], items, None, upload=False) for h in table[s]]
        assert {o.sha for o in outs} == {outs[0].sha} and outs[0].update is not None  # alike, and merged
        assert all(list(o.excluded) == [who] and o.excluded[who].startswith(why) for o in outs), \
            [o.excluded for o in outs]


def test_a_reader_falls_back_to_another_voters_copy_when_one_is_bad(s3_server):
    """A decided update lists every agreeing merger's copy: a copy that is missing, altered or
    oversized is skipped and the next one is used; with no good copy the reader fails (abstains)."""
    storage = s3_server.storage()
    board = StorageBoard(storage)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    n = 300
    vec = torch.linspace(-1, 1, n)
    blob = pack_update(vec, 0.5, CFG.merged)
    sha = hashlib.sha256(blob).hexdigest()
    keys = {name: f"{prefix}/merged/{name}" for name in ("good", "altered", "oversized", "missing")}
    storage.put(keys["good"], blob)
    storage.put(keys["altered"], blob[:-1] + bytes([blob[-1] ^ 1]))
    storage.put(keys["oversized"], blob + b"\0" * 4096)
    urls = {name: board.get_url(k) for name, k in keys.items()}
    xfer = ObjectTransfer(tries=1)
    ref, got = read_update(xfer, [urls["missing"], urls["altered"], urls["oversized"], urls["good"]], sha, n,
                           CFG.merged, "merged shard 0")
    assert ref == 0.5 and torch.equal(got, decode(blob[4:], n, CFG.merged))
    with pytest.raises(TransferError, match="no copy of 3 is readable"):
        read_update(xfer, [urls["missing"], urls["altered"], urls["oversized"]], sha, n, CFG.merged, "shard 0")

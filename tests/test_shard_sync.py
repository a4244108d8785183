"""The sharded sync over a real rclone S3 with the bridge's own signer: replicas end bit-identical,
one liar per shard is outvoted, a corrupt piece is left out, bytes per replica stay flat in R."""
from __future__ import annotations

import hashlib
import uuid

import torch

from neurons.shard_sync import Piece, ReplicaSync, pg_key, strict_majority
from neurons.transfer import ObjectTransfer
from resbm.shard_merge import zero_momentum
from resbm.shards import assign_mergers
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
        decided.append((merged[holder][s].key, sha))
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

"""Shards, their assignment, and the robust merge + outer step applied per shard."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from resbm.outer import nesterov_step
from resbm.robust_merge import MergeParams, robust_merge
from resbm.shard_merge import apply_update, catch_up, merge_shard, zero_momentum
from resbm.shards import assign_mergers, layout, put, shards_of, take
from resbm.sync_codec import Codec, decode, encode

SHAPES = {"a.w": (40, 30), "b.b": (70,), "c.w": (9, 11)}
P = MergeParams(outer_lr=0.7, outer_momentum=0.9)
FP32 = Codec("fp32", 64)


def tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


def honest(seed: int) -> dict[str, torch.Tensor]:
    base = tensors(1000)
    return {n: base[n] + 0.3 * t for n, t in tensors(seed).items()}


def test_layout_covers_the_vector_in_block_aligned_shards():
    lay = layout(SHAPES, 4, 64)
    total = sum(math.prod(s) for s in SHAPES.values())
    assert lay.total == total and lay[0][0] == 0 and lay[-1][1] == total
    assert all(a % 64 == 0 and b > a for a, b in lay)
    assert all(lay[i][1] == lay[i + 1][0] for i in range(len(lay) - 1))
    assert len(lay) == 4
    assert len(layout(SHAPES, 10_000, 64)) == math.ceil(total / 64)  # never an empty shard


def test_take_put_round_trip_across_tensor_boundaries():
    t = tensors(1)
    flat = torch.cat([t[n].reshape(-1) for n in sorted(t)])
    for a, b in layout(SHAPES, 5, 8):
        assert torch.equal(take(t, a, b), flat[a:b])
    z = {n: torch.zeros(s) for n, s in SHAPES.items()}
    for a, b in layout(SHAPES, 3, 8):
        put(z, a, flat[a:b])
    assert all(torch.equal(z[n], t[n]) for n in SHAPES)
    with pytest.raises(ValueError):
        take(t, 0, flat.numel() + 1)


def test_assignment_is_deterministic_distinct_and_balanced():
    hks = [f"hk{i:02d}" for i in range(8)]
    a = assign_mergers(5, 1, hks, 16, 3)
    assert a == assign_mergers(5, 1, list(reversed(hks)), 16, 3)  # order of the input is irrelevant
    assert a != assign_mergers(6, 1, hks, 16, 3) and a != assign_mergers(5, 2, hks, 16, 3)
    assert all(len(set(s)) == 3 for s in a)
    load = Counter(h for s in a for h in s)
    assert set(load) == set(hks) and max(load.values()) - min(load.values()) <= 1
    assert sum(len(shards_of(a, h)) for h in hks) == 16 * 3
    assert assign_mergers(0, 0, ["x", "y"], 4, 3) == [["x", "y"]] * 4  # fewer replicas than mergers
    assert assign_mergers(0, 0, [], 2, 3) == [[], []]


@pytest.mark.parametrize("r", [2, 8, 32, 128])
def test_values_each_replica_merges_are_flat_in_r(r):
    hks = [f"h{i}" for i in range(r)]
    n_shards, m = 64, 2
    a = assign_mergers(3, 0, hks, n_shards, m)
    worst = max(len(shards_of(a, h)) for h in hks)
    # values downloaded to merge: (R - 1) items of each merged shard of size 1/n_shards
    assert worst * (r - 1) / n_shards <= m * 1.1 + (r - 1) / n_shards


def sharded_round(theta, mom, refs, items, lay, codec=FP32):
    merged, new_refs = [], []
    for s, (a, b) in enumerate(lay):
        sm = merge_shard([(n, take(d, a, b)) for n, d in items], b - a, refs[s], P, codec)
        merged.append(sm.merged)
        new_refs.append(sm.ref)
    apply_update(theta, mom, lay, merged, P)
    return merged, new_refs


def test_one_shard_equals_the_global_merge_and_outer_step_bit_for_bit():
    items = [(10, honest(i)) for i in range(4)]
    theta, lay = tensors(7), layout(SHAPES, 1, 64)
    th, mo = {n: t.clone() for n, t in theta.items()}, zero_momentum(theta)
    sharded_round(th, mo, [None], items, lay)
    g, _ = robust_merge(items, None, P)
    want, _ = nesterov_step(theta, g, None, P.outer_lr, P.outer_momentum)
    assert all(torch.equal(th[n], want[n]) for n in SHAPES)


@pytest.mark.parametrize("r", [2, 3, 5])
def test_column_chunked_merge_equals_robust_merge_bit_for_bit(monkeypatch, r):
    import resbm.shard_merge as sm
    monkeypatch.setattr(sm, "COLUMNS", 100)  # many chunks, a ragged last one
    items = [(10 + i, {"v": take(honest(i), 0, 1300) * (1 + 3 * i)}) for i in range(r)]
    want, ref = robust_merge(items, 0.5, P)
    got = sm.merge_shard([(s, d["v"]) for s, d in items], 1300, 0.5, P, FP32)
    assert got.ref == ref and torch.equal(got.merged, want["v"])


def test_many_shards_without_clipping_equal_the_global_step():
    # R = 2, identical items: no clip triggers on any shard, so sharding changes nothing
    items = [(10, honest(0)), (10, {n: t.clone() for n, t in honest(0).items()})]
    theta = tensors(7)
    th, mo = {n: t.clone() for n, t in theta.items()}, zero_momentum(theta)
    lay = layout(SHAPES, 7, 64)
    sharded_round(th, mo, [None] * len(lay), items, lay)
    g, _ = robust_merge(items, None, P)
    want, _ = nesterov_step(theta, g, None, P.outer_lr, P.outer_momentum)
    assert all(torch.equal(th[n], want[n]) for n in SHAPES)


def test_per_shard_clip_bounds_an_attacker_it_cannot_move():
    lay = layout(SHAPES, 4, 64)
    good = [(10, honest(i)) for i in range(4)]
    evil = (10_000, {n: t * 1000 for n, t in tensors(99).items()})
    merged_h, refs_h = sharded_round(tensors(7), zero_momentum(tensors(7)), [None] * len(lay), good, lay)
    merged_e, refs_e = sharded_round(tensors(7), zero_momentum(tensors(7)), [None] * len(lay), good + [evil], lay)
    for s, (a, b) in enumerate(lay):
        honest_norms = sorted(float(take(d, a, b).norm()) for _, d in good)
        assert honest_norms[0] * 0.999 <= refs_e[s] <= honest_norms[-1] * 1.001  # the liar cannot lift it
        assert float(merged_e[s].norm()) <= 2 * P.clip_factor * refs_e[s]
        cos = torch.nn.functional.cosine_similarity(merged_e[s], merged_h[s], dim=0)
        assert float(cos) > 0.9  # trimmed away: the honest direction survives
    # the floor: a round of tiny honest norms cannot pull the bound under ref_floor x previous
    tiny = [(10, {n: t * 1e-6 for n, t in honest(i).items()}) for i in range(3)]
    _, refs_t = sharded_round(tensors(7), zero_momentum(tensors(7)), refs_h, tiny, lay)
    assert all(rt >= P.ref_floor * rh * 0.999 for rt, rh in zip(refs_t, refs_h))


def test_screening_per_shard_excludes_the_bad_item_and_names_it():
    lay = layout(SHAPES, 2, 64)
    a, b = lay[0]
    bad = take(honest(1), a, b)
    bad[0] = float("nan")
    sm = merge_shard([(10, take(honest(0), a, b)), (10, bad), (0, take(honest(2), a, b)), (5, None)],
                     b - a, None, P, FP32)
    assert sm.kept == [0] and {i for i, _ in sm.excluded} == {1, 2, 3}
    nothing = merge_shard([(10, None)], b - a, 3.0, P, FP32)
    assert nothing.merged is None and nothing.ref == 3.0


def test_quantized_merged_update_is_what_everyone_applies():
    lay = layout(SHAPES, 3, 64)
    c = Codec("int8", 64)
    items = [(10, honest(i)) for i in range(3)]
    th_a, mo_a = tensors(7), zero_momentum(tensors(7))
    merged, _ = sharded_round(th_a, mo_a, [None] * 3, items, lay, c)
    # a replica that merged nothing downloads the encoded shards and applies the decoded vectors
    th_b, mo_b = tensors(7), zero_momentum(tensors(7))
    wire = [encode(v, c) for v in merged]
    apply_update(th_b, mo_b, lay, [decode(w, b - a, c) for w, (a, b) in zip(wire, lay)], P)
    assert all(torch.equal(th_a[n], th_b[n]) and torch.equal(mo_a[n], mo_b[n]) for n in SHAPES)


def test_a_joiner_catches_up_from_a_checkpoint_plus_the_updates_since():
    lay = layout(SHAPES, 3, 64)
    c = Codec("int4", 64)
    live_t, live_m = tensors(7), zero_momentum(tensors(7))
    refs = [None] * 3
    history = []
    ckpt = None
    for rnd in range(5):
        if rnd == 2:  # checkpoint every K = 2 rounds: this is the state at the start of round 2
            ckpt = ({n: t.clone() for n, t in live_t.items()}, {n: t.clone() for n, t in live_m.items()})
        merged, refs = sharded_round(live_t, live_m, refs, [(10, honest(rnd * 10 + i)) for i in range(3)],
                                     lay, c)
        history.append(merged)
    th, mo = catch_up(ckpt[0], ckpt[1], lay, history[2:], P)
    assert all(torch.equal(th[n], live_t[n]) and torch.equal(mo[n], live_m[n]) for n in SHAPES)
    th0, _ = catch_up(ckpt[0], ckpt[1], lay, history[3:], P)  # one update missed: not the same
    assert not all(torch.equal(th0[n], live_t[n]) for n in SHAPES)

"""The robust outer merge: one lying replica can cancel at most, never reverse or capture."""
from __future__ import annotations

import math

import pytest
import torch

from resbm import outer
from resbm.robust_merge import (ZERO_UPDATE, MergeParams, capped_weights, lower_median, outer_round, robust_merge,
                                screen)

SHAPES = {"a.w": (8, 4), "b.b": (5,)}
P = MergeParams()


def pg(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


def honest(seed: int) -> dict[str, torch.Tensor]:
    """Replicas that agree on a direction, with their own noise."""
    base = pg(1000)
    return {n: base[n] + 0.3 * t for n, t in pg(seed).items()}


def flat(d):
    return torch.cat([d[n].reshape(-1) for n in sorted(d)])


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0))


def mean(ds):
    return {n: sum(d[n] for d in ds) / len(ds) for n in SHAPES}


def test_lower_median_and_capped_weights():
    assert lower_median([3, 1]) == 1 and lower_median([5, 1, 3]) == 3 and lower_median([4, 1, 3, 2]) == 2
    assert capped_weights([1000, 10]) == [10.0, 10.0]  # two replicas: equal say
    assert capped_weights([1000, 10, 12]) == [12.0, 10.0, 12.0]


def test_two_replicas_a_huge_flipped_liar_cancels_at_most():
    h = honest(1)
    liar = {n: -t * 1e6 for n, t in h.items()}
    for items in ([(10, h), (10_000, liar)], [(10_000, liar), (10, h)]):
        merged, ref = robust_merge(items, None, P)
        assert all(bool(torch.isfinite(t).all()) for t in merged.values())
        assert torch.linalg.vector_norm(flat(merged)) <= 1e-5 * torch.linalg.vector_norm(flat(h)) + 1e-6
        assert abs(ref - float(torch.linalg.vector_norm(flat(h)))) < 1e-3 * ref


def test_two_replicas_scaled_liar_never_reverses_the_honest_update():
    h = honest(2)
    for scale in (-1.0, -2.0, -50.0, 0.5, 3.0):
        merged, _ = robust_merge([(5, h), (500, {n: t * scale for n, t in h.items()})], None, P)
        assert float(flat(merged) @ flat(h)) >= -1e-6


def test_three_or_more_replicas_outvote_a_flipped_heavy_liar():
    for r in (3, 4, 8):
        hs = [honest(s) for s in range(r - 1)]
        liar = {n: -t * 1000 for n, t in mean(hs).items()}
        merged, _ = robust_merge([(1, d) for d in hs] + [(10**6, liar)], None, P)
        assert cos(merged, mean(hs)) > 0.9, r


def test_a_zero_liar_cannot_shrink_the_update_below_the_floor():
    h = honest(3)
    zero = {n: torch.zeros_like(t) for n, t in h.items()}
    hn = float(torch.linalg.vector_norm(flat(h)))
    no_history, ref0 = robust_merge([(1, h), (1, zero)], None, P)
    assert ref0 == float(torch.linalg.vector_norm(flat(h)).to(torch.float32)) or abs(ref0 - hn) < 1e-4 * hn
    assert cos(no_history, h) > 0.99  # an all-zero item does not set the bound, even in round 0
    tiny = {n: t * 1e-9 for n, t in h.items()}
    floored, ref = robust_merge([(1, h), (1, tiny)], hn, P)
    assert ref == float(torch.tensor(P.ref_floor * hn, dtype=torch.float32))
    assert torch.linalg.vector_norm(flat(floored)) > 0.2 * hn and cos(floored, h) > 0.99


def test_a_replica_that_took_no_steps_does_not_dilute_the_merge():
    h, zero = honest(3), {n: torch.zeros_like(t) for n, t in honest(3).items()}
    sc = screen([(4, h), (4, zero)], SHAPES, drop_zero=True)
    assert [i for i, _, _ in sc.kept] == [0] and sc.excluded == [(1, ZERO_UPDATE)]
    merged, _ = robust_merge([(s, d) for _, s, d in sc.kept], None, P)
    assert all(torch.equal(merged[n], h[n]) for n in SHAPES)  # not halved by the idle replica
    assert [i for i, _, _ in screen([(4, h), (4, zero)], SHAPES).kept] == [0, 1]  # shards keep zeros
    both = screen([(4, zero), (4, dict(zero))], SHAPES, drop_zero=True)  # nobody moved: all stay,
    assert [i for i, _, _ in both.kept] == [0, 1] and not both.excluded  # so momentum still steps


def test_screen_excludes_nan_undecodable_wrong_shape_and_unverified_items():
    good = honest(4)
    nan = {n: t.clone() for n, t in good.items()}
    nan["a.w"][0, 0] = float("nan")
    wrong = dict(good, **{"b.b": torch.zeros(6)})
    sc = screen([(3, good), (3, nan), (3, None), (3, wrong), (0, good), (2, {"a.w": good["a.w"]})], SHAPES)
    assert [i for i, _, _ in sc.kept] == [0]
    reasons = dict(sc.excluded)
    assert "not finite" in reasons[1] and reasons[2] == "undecodable" and "shape" in reasons[3]
    assert reasons[4] == "no verified samples" and reasons[5] == "wrong parameter names"


def test_outer_round_is_bit_identical_and_round_trips_through_state_bytes():
    theta = pg(7)
    items = [(4, honest(5)), (6, honest(6)), (5, honest(8))]
    a = outer_round(theta, None, None, items, P)
    b = outer_round(theta, None, None, [(s, {n: t.clone() for n, t in d.items()}) for s, d in items], P)
    blob = outer.state_bytes(*a)
    assert blob == outer.state_bytes(*b)
    st = outer.load_state(blob, expected=SHAPES)
    assert st.ref_norm == a[2] and all(torch.equal(st.theta[n], a[0][n]) for n in SHAPES)
    assert outer.load_state(outer.state_bytes(theta, None)).ref_norm is None  # older states load


def test_no_usable_item_keeps_the_state():
    theta, mom = pg(9), pg(10)
    t2, m2, ref = outer_round(theta, mom, 1.5, [], P)
    assert ref == 1.5 and all(torch.equal(t2[n], theta[n]) and torch.equal(m2[n], mom[n]) for n in SHAPES)


@pytest.mark.parametrize("r,frac", [(3, 0.25), (4, 0.25), (5, 0.4), (8, 0.25), (9, 0.34), (12, 0.25), (12, 0.1), (7, 0.49)])
def test_trimmed_mean_drops_max_1_floor_r_times_fraction_per_side(r, frac):
    """The drop count is max(1, floor(R x trim_fraction)) per side (and always leaves one value):
    a merge that always drops 1 fails here wherever floor(R x f) >= 2, both the whole-state merge
    and the sharded one."""
    from resbm.shard_merge import merge_shard
    from resbm.sync_codec import Codec
    p = MergeParams(clip_factor=1000.0, trim_fraction=frac)
    values = [float(i * i) for i in range(r)]  # asymmetric: every drop count gives another mean
    items = [(1, {"v": torch.tensor([v, -v])}) for v in values]
    t = min(max(1, math.floor(r * frac)), (r - 1) // 2)
    kept = values[t:r - t]
    want = sum(kept) / len(kept)
    merged, _ = robust_merge(items, None, p)
    assert merged["v"].tolist() == pytest.approx([want, -want], rel=1e-6)
    sm = merge_shard([(1, d["v"]) for _, d in items], 2, None, p, Codec("fp32", 8))
    assert sm.merged.tolist() == pytest.approx([want, -want], rel=1e-6)
    if t >= 2:  # the mutant's answer differs
        one = values[1:r - 1]
        assert abs(sum(one) / len(one) - want) > 1e-3

"""Outer step: pseudo-gradients, robust merge, Nesterov, canonical state bytes and their checks."""
import random

import pytest
import torch

from resbm import outer

SHAPES = {"blocks.0.w": (8, 6), "blocks.0.g": (6,), "head.w": (5, 6)}


def _rand(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


def _shuffled(d: dict) -> dict:
    keys = list(d)
    random.Random(7).shuffle(keys)
    return {k: d[k].clone() for k in keys}


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[n] - b[n]).pow(2).sum()) for n in a) ** 0.5
    den = sum(float(b[n].pow(2).sum()) for n in b) ** 0.5
    return num / den


def test_pseudo_gradient_is_start_minus_local_in_fp32():
    start = {n: t.double() for n, t in _rand(1).items()}
    local = _rand(2)
    pg = outer.pseudo_gradient(start, local)
    assert list(pg) == sorted(SHAPES)
    for n in SHAPES:
        assert pg[n].dtype == torch.float32
        assert torch.equal(pg[n], start[n].float() - local[n])


def test_pseudo_gradient_rejects_mismatched_names():
    local = _rand(2)
    del local["head.w"]
    with pytest.raises(outer.OuterError, match="head.w"):
        outer.pseudo_gradient(_rand(1), local)


def test_mean_weights_by_sample_count():
    a, b = _rand(1), _rand(2)
    merged = outer.merge([(3, a), (1, b)], method="mean")
    for n in SHAPES:
        torch.testing.assert_close(merged[n], 0.75 * a[n] + 0.25 * b[n])


def test_clipped_mean_equals_weighted_mean_when_nobody_exceeds_the_bound():
    items = [(2, _rand(1)), (1, _rand(2)), (1, _rand(3))]
    clipped = outer.merge(items, method="clipped-mean", clip_factor=2.0)
    plain = outer.merge(items, method="mean")
    assert _rel(clipped, plain) < 1e-6


@pytest.mark.parametrize("method", ["clipped-mean", "trimmed-mean"])
def test_merge_is_robust_to_one_garbage_replica(method):
    base = _rand(0)
    honest = [{n: base[n] + 0.1 * t for n, t in _rand(10 + i).items()} for i in range(4)]
    garbage = _rand(99, scale=1e6)
    items = [(8, h) for h in honest[:2]] + [(8, garbage)] + [(8, h) for h in honest[2:]]
    honest_mean = outer.merge([(8, h) for h in honest], method="mean")
    naive = outer.merge(items, method="mean")
    robust = outer.merge(items, method=method)
    assert _rel(naive, honest_mean) > 1e4  # without protection the garbage dominates
    if method == "clipped-mean":
        # The garbage (weight 1/5) is scaled to 2x the median norm, so the damage is bounded by
        # w_bad * (||honest_mean|| + 2 * median) / ||honest_mean||, whatever the garbage's size.
        hm_norm = outer._global_norm(honest_mean)
        median = sorted(outer._global_norm(h) for h in honest)[2]
        bound = 0.2 * (hm_norm + 2.0 * median) / hm_norm
    else:
        bound = 0.1  # per coordinate the extreme value is dropped; what is left is honest spread
    assert _rel(robust, honest_mean) < bound


def test_merge_is_bit_identical_from_shuffled_inputs():
    items = [(5, _rand(1)), (3, _rand(2)), (7, _rand(3, scale=50.0))]
    for method in outer.MERGE_METHODS:
        a = outer.merge(items, method=method)
        b = outer.merge([(c, _shuffled(d)) for c, d in items], method=method)
        mom = _rand(4)
        ta, ma = outer.nesterov_step(_rand(5), a, mom, lr=0.7, momentum_coef=0.9)
        tb, mb = outer.nesterov_step(_shuffled(_rand(5)), b, _shuffled(mom), lr=0.7, momentum_coef=0.9)
        assert outer.state_hash(ta, ma) == outer.state_hash(tb, mb)
        assert outer.state_bytes(ta, ma) == outer.state_bytes(_shuffled(tb), _shuffled(mb))


def test_merge_is_bit_identical_across_thread_counts():
    big = {"w": torch.randn(256, 512, generator=torch.Generator().manual_seed(3))}
    items = [(4, big), (2, {"w": big["w"] * 3.0 + 1.0}), (3, {"w": -big["w"]})]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        h1 = outer.tensors_hash(outer.merge(items))
        torch.set_num_threads(2)
        h2 = outer.tensors_hash(outer.merge(items))
    finally:
        torch.set_num_threads(old)
    assert h1 == h2


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("head.w"), "names differ"),
        (lambda d: d.__setitem__("head.w", torch.zeros(5, 7)), "shape"),
        (lambda d: d["head.w"].__setitem__((0, 0), float("nan")), "NaN"),
        (lambda d: d.__setitem__("head.w", torch.zeros(5, 6, dtype=torch.int64)), "dtype"),
    ],
)
def test_merge_names_the_offending_replica(mutate, match):
    items = [(1, _rand(1)), (1, _rand(2)), (1, _rand(3))]
    mutate(items[2][1])
    with pytest.raises(outer.MergeError, match=match) as info:
        outer.merge(items)
    assert info.value.replica == 2
    assert "replica 2" in str(info.value)


def test_merge_rejects_bad_counts_methods_and_too_few_for_trim():
    with pytest.raises(outer.MergeError, match="sample_count"):
        outer.merge([(1, _rand(1)), (0, _rand(2))])
    with pytest.raises(outer.OuterError, match="unknown merge method"):
        outer.merge([(1, _rand(1))], method="median")
    with pytest.raises(outer.OuterError, match="needs >= 3"):
        outer.merge([(1, _rand(1)), (1, _rand(2))], method="trimmed-mean")


def test_nesterov_step_matches_formula_and_round_zero():
    theta, g = _rand(1), _rand(2)
    t0, m0 = outer.nesterov_step(theta, g, None, lr=0.5, momentum_coef=0.9)
    for n in SHAPES:
        assert torch.equal(m0[n], g[n])
        torch.testing.assert_close(t0[n], theta[n] - 0.5 * (g[n] + 0.9 * g[n]))
    g2 = _rand(3)
    t1, m1 = outer.nesterov_step(t0, g2, m0, lr=0.5, momentum_coef=0.9)
    for n in SHAPES:
        torch.testing.assert_close(m1[n], 0.9 * m0[n] + g2[n])
        torch.testing.assert_close(t1[n], t0[n] - 0.5 * (g2[n] + 0.9 * m1[n]))


def test_state_round_trip_and_hash():
    theta, mom = _rand(1), _rand(2)
    blob = outer.state_bytes(theta, mom)
    t2, m2 = outer.state_from_bytes(blob, SHAPES, max_bytes=len(blob))
    assert all(torch.equal(t2[n], theta[n]) and torch.equal(m2[n], mom[n]) for n in SHAPES)
    assert outer.state_hash(t2, m2) == outer.state_hash(theta, mom)
    t3, m3 = outer.state_from_bytes(outer.state_bytes(theta, None), list(SHAPES))
    assert m3 is None and set(t3) == set(SHAPES)
    assert b"__metadata__" not in blob


def test_state_from_bytes_rejects_bad_objects():
    theta, mom = _rand(1), _rand(2)
    blob = outer.state_bytes(theta, mom)
    with pytest.raises(outer.StateError, match="over the limit"):
        outer.state_from_bytes(blob, SHAPES, max_bytes=len(blob) - 1)
    with pytest.raises(outer.StateError, match="not a valid safetensors"):
        outer.state_from_bytes(blob[:-10], SHAPES)
    with pytest.raises(outer.StateError, match="not a valid safetensors"):
        outer.state_from_bytes(b"\x80\x03cos\nsystem\n", SHAPES)  # a pickle is refused
    wrong = dict(SHAPES, **{"head.w": (6, 5)})
    with pytest.raises(outer.StateError, match="head.w has shape"):
        outer.state_from_bytes(blob, wrong)
    with pytest.raises(outer.StateError, match="missing names"):
        outer.state_from_bytes(blob, dict(SHAPES, extra=(1,)))
    bad = dict(theta)
    bad["head.w"] = theta["head.w"].clone()
    bad["head.w"][1, 1] = float("inf")
    with pytest.raises(outer.StateError, match="NaN or Inf"):
        outer.state_from_bytes(outer.state_bytes(bad, mom), SHAPES)
    from safetensors.torch import save

    half = save({"theta.head.w": theta["head.w"].half()})
    with pytest.raises(outer.StateError, match="dtype"):
        outer.state_from_bytes(half)
    with pytest.raises(outer.StateError, match="unexpected key"):
        outer.state_from_bytes(save({"weights.x": torch.zeros(2)}))


def test_tensors_round_trip_and_checks():
    pg = _rand(3)
    blob = outer.tensors_bytes(_shuffled(pg))
    assert blob == outer.tensors_bytes(pg)
    back = outer.tensors_from_bytes(blob, SHAPES)
    assert all(torch.equal(back[n], pg[n]) for n in SHAPES)
    with pytest.raises(outer.StateError, match="blocks.0.g has shape"):
        outer.tensors_from_bytes(blob, dict(SHAPES, **{"blocks.0.g": (7,)}))

"""Scoring: verified throughput x integrity, EMA, weights with burn share, audit selection."""
import random

import pytest

from neurons import scoring
from neurons.scoring import AuditHistory, ScoreBook, choose_audits, compute_weights


def test_hop_throughput_weights_compute():
    assert scoring.hop_throughput({"fwd": 4, "bwd": 3, "fwdbwd": 2, "bwd_recompute": 1}) == 4 + 6 + 6 + 3
    with pytest.raises(scoring.ScoringError, match="unknown hop kind 'fwdd'"):
        scoring.hop_throughput({"fwdd": 1})
    with pytest.raises(scoring.ScoringError, match="non-negative int"):
        scoring.hop_throughput({"fwd": -1})


def test_twice_the_verified_hops_gives_about_twice_the_weight():
    book = ScoreBook(alpha=0.5)
    for window in range(6):
        book.record_round("A", window, {"fwd": 10, "bwd": 10})
        book.record_round("B", window, {"fwd": 20, "bwd": 20})
        book.record_audit("B", window, passed=True)
        book.close_window()
    s = book.scores()
    uids, weights = compute_weights({1: s["A"], 2: s["B"]}, [0, 1, 2], owner_uid=0, burn_share=0.0)
    assert uids == [1, 2]
    assert weights[1] / weights[0] == pytest.approx(2.0, rel=1e-9)
    assert sum(weights) == pytest.approx(1.0)


def test_failed_audit_zeroes_score_and_penalises_following_windows():
    book = ScoreBook(alpha=0.5, penalty_windows=2)
    for r in range(3):
        book.record_round("A", r, {"fwdbwd": 10})
        book.close_window()
    assert book.scores()["A"] > 0
    book.record_round("A", 3, {"fwdbwd": 10})
    book.record_audit("A", 2, passed=False, reason="output mismatch")  # a late verdict on a closed round
    assert book.scores()["A"] == 0.0
    assert book.window_score("A") == 0.0
    for r in range(4, 6):  # the voided window plus two penalty windows earn nothing
        book.close_window()
        book.record_round("A", r, {"fwdbwd": 10})
        assert book.window_score("A") == 0.0
    book.close_window()
    assert book.scores()["A"] == 0.0
    book.record_round("A", 6, {"fwdbwd": 10})
    assert book.window_score("A") == 30.0  # penalty over
    history = book.audit_history()["A"]
    assert history.failed == 1 and history.passed == 0


def test_failed_round_in_open_window_is_excluded_but_passed_rounds_count():
    book = ScoreBook(alpha=1.0, penalty_windows=0)
    book.record_round("A", 1, {"fwd": 5})
    book.record_round("A", 2, {"fwd": 7})
    book.record_audit("A", 2, passed=True)
    assert book.window_score("A") == 12.0
    book.record_audit("A", 1, passed=False)
    assert book.close_window()["A"] == 0.0  # the window of a failed audit is void even with P = 0


def test_ema_behaviour():
    book = ScoreBook(alpha=0.25)
    book.record_round("A", 0, {"fwd": 100})
    assert book.close_window()["A"] == pytest.approx(25.0)
    book.record_round("A", 1, {"fwd": 100})
    assert book.close_window()["A"] == pytest.approx(25.0 + 0.25 * 75.0)
    assert book.close_window()["A"] == pytest.approx(0.75 * 43.75)  # absent: decays
    for r in range(60):
        book.record_round("A", 2 + r, {"fwd": 100})
        book.close_window()
    assert book.scores()["A"] == pytest.approx(100.0, rel=1e-6)


def test_book_json_round_trip_and_atomic_save(tmp_path):
    book = ScoreBook(alpha=0.4, penalty_windows=5)
    book.record_round("A", 0, {"fwd": 3, "bwd": 1})
    book.record_round("B", 0, {"fwdbwd": 2})
    book.close_window()
    book.record_round("A", 1, {"fwd": 1})
    book.record_audit("B", 0, passed=False)
    path = tmp_path / "scores.json"
    book.save(str(path))
    back = ScoreBook.load(str(path))
    assert back.to_json() == book.to_json()
    assert back.window_score("A") == 1.0 and back.scores() == book.scores()
    assert back.audit_history()["B"].failed == 1
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]
    fresh = ScoreBook.load(str(tmp_path / "missing.json"), alpha=0.9)
    assert fresh.alpha == 0.9 and fresh.scores() == {}
    with pytest.raises(scoring.ScoringError, match="corrupt"):
        ScoreBook.from_json('{"format": 1, "alpha": 0.3}')
    with pytest.raises(scoring.ScoringError, match="format"):
        ScoreBook.from_json('{"format": 99}')


def test_burn_share_lands_on_owner():
    uids, weights = compute_weights({3: 1.0, 5: 3.0}, [0, 3, 5, 7], owner_uid=7, burn_share=0.2)
    assert uids == [3, 5, 7]
    assert weights == pytest.approx([0.2, 0.6, 0.2])


def test_all_to_owner_when_nobody_qualifies():
    assert compute_weights({}, [0, 1, 2], owner_uid=1, burn_share=0.1) == ([1], [1.0])
    assert compute_weights({0: 0.0, 2: 0.0, 9: 5.0}, [0, 1, 2], owner_uid=1, burn_share=0.0) == ([1], [1.0])
    # the owner's own score never earns it miner share
    assert compute_weights({1: 8.0}, [0, 1], owner_uid=1, burn_share=0.0) == ([1], [1.0])


def test_compute_weights_rejects_bad_input():
    with pytest.raises(scoring.ScoringError, match="burn_share"):
        compute_weights({1: 1.0}, [0, 1], owner_uid=0, burn_share=1.5)
    with pytest.raises(scoring.ScoringError, match="score of uid 1"):
        compute_weights({1: float("nan")}, [0, 1], owner_uid=0, burn_share=0.1)
    with pytest.raises(scoring.ScoringError, match="owner uid 4"):
        compute_weights({1: 1.0}, [0, 1], owner_uid=4, burn_share=0.1)


def test_choose_audits_biased_toward_new_and_failed_miners():
    miners = [f"m{i}" for i in range(6)]
    history = {
        "m0": AuditHistory(passed=10), "m1": AuditHistory(passed=10), "m2": AuditHistory(passed=10),
        "m3": AuditHistory(passed=10), "m4": AuditHistory(passed=10, failed=1),
    }  # m5 is new
    rng = random.Random(1234)
    counts = dict.fromkeys(miners, 0)
    draws = 4000
    for _ in range(draws):
        for h in choose_audits(miners, rng, fraction=0.1, history=history):
            counts[h] += 1
    # independent draws with p = 0.1 (veteran), 0.4 (failed: 4x), 0.3 (new: 3x); when nobody is
    # drawn (prob p_none) one miner is picked in proportion to p.
    p = {f"m{i}": 0.1 for i in range(4)} | {"m4": 0.4, "m5": 0.3}
    p_none = 0.9**4 * 0.6 * 0.7
    expect = {h: p[h] + p_none * p[h] / sum(p.values()) for h in p}
    veteran = sum(counts[f"m{i}"] for i in range(4)) / 4 / draws
    assert veteran == pytest.approx(expect["m0"], abs=0.015)
    assert counts["m4"] / draws == pytest.approx(expect["m4"], abs=0.03)
    assert counts["m5"] / draws == pytest.approx(expect["m5"], abs=0.03)
    assert counts["m4"] / draws > 3 * veteran and counts["m5"] / draws > 2.3 * veteran


def test_choose_audits_always_picks_someone_and_is_unpredictable_by_default():
    picks = [choose_audits(["a", "b", "c"], random.Random(s), fraction=0.01) for s in range(50)]
    assert all(len(p) >= 1 for p in picks)
    assert choose_audits([], fraction=0.5) == []
    # unseeded: 20 new miners at p = 0.3 each; 20 draws repeating a subset is vanishingly unlikely
    unseeded = {tuple(choose_audits([f"m{i}" for i in range(20)], fraction=0.1)) for _ in range(20)}
    assert len(unseeded) > 15
    with pytest.raises(scoring.ScoringError, match="fraction"):
        choose_audits(["a"], fraction=0.0)

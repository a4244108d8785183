"""Incentive parameters: validated in the run config, used by the validator's scoring, and the
simulator drives those same functions (its verdicts move when the parameters do)."""
from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from neurons import scoring
from neurons.scoring import ScoreBook, choose_audits
from protocol.incentives import DEFAULT_INCENTIVES, IncentiveParams
from protocol.run_config import RunConfig
from scripts import incentive_sim, simulate_incentives
from scripts.incentive_sim import CheaterSpec, Population, SybilSpec, gini, simulate
from tests.servers import tiny_run_config


def test_defaults_keep_the_scoring_constants():
    assert scoring.HOP_WEIGHTS == {"fwd": 1.0, "bwd": 2.0, "fwdbwd": 3.0, "bwd_recompute": 3.0}
    book = ScoreBook()
    assert (book.alpha, book.penalty_windows) == (0.3, 3)
    assert RunConfig.model_validate(tiny_run_config()).incentives == DEFAULT_INCENTIVES


@pytest.mark.parametrize("bad, needle", [
    ({"hop_weights": {"fwd": 1.0}}, "missing"),
    ({"hop_weights": {"fwd": 1, "bwd": 2, "fwdbwd": 3, "bwd_recompute": 3, "xyz": 1}}, "unknown"),
    ({"hop_weights": {"fwd": -1, "bwd": 2, "fwdbwd": 3, "bwd_recompute": 3}}, "hop_weights.fwd"),
    ({"ema_alpha": 0}, "ema_alpha"),
    ({"burn_share": 1.5}, "burn_share"),
    ({"audit_fraction": 0}, "audit_fraction"),
    ({"stage_weights": [1.0, float("nan")]}, "stage_weights[1]"),
    ({"no_such_knob": 1}, "no_such_knob"),
])
def test_bad_incentives_are_refused_naming_the_field(bad, needle):
    with pytest.raises(ValidationError) as exc:
        RunConfig.model_validate(tiny_run_config(incentives=bad))
    assert needle in str(exc.value)


def test_stage_weights_must_match_the_stages():
    with pytest.raises(ValidationError, match="one weight per stage"):
        RunConfig.model_validate(tiny_run_config(incentives={"stage_weights": [1.0, 2.0, 3.0]}))
    run = RunConfig.model_validate(tiny_run_config(incentives={"stage_weights": [1.0, 2.5]}))
    book = ScoreBook.from_params(run.incentives)
    assert book.record_round("a", 0, {"fwd": 2, "bwd": 1}, stage=1) == pytest.approx(2.5 * 4)
    with pytest.raises(scoring.ScoringError, match="stage 2"):
        book.record_round("a", 0, {"fwd": 1}, stage=2)


def test_params_drive_scoring_audits_and_penalties():
    p = IncentiveParams(hop_weights={"fwd": 5, "bwd": 1, "fwdbwd": 1, "bwd_recompute": 1},
                        ema_alpha=1.0, penalty_windows=1, penalty_growth=3.0,
                        audit_fraction=1.0, new_boost=1.0)
    book = ScoreBook.from_params(p)
    assert book.record_round("m", 0, {"fwd": 2}) == 10.0
    assert choose_audits(["a", "b", "c"], random.Random(0), params=p) == ["a", "b", "c"]
    book.record_audit("m", 0, False)
    assert book.close_window()["m"] == 0.0
    book.record_audit("m", 1, False)  # second failure: 1 x 3 windows
    assert book._miners["m"].penalty_until == book.window + 3


def test_loaded_book_takes_the_runs_params(tmp_path):
    path = str(tmp_path / "book.json")
    ScoreBook(alpha=0.5, penalty_windows=1).save(path)
    p = IncentiveParams(ema_alpha=0.2, penalty_windows=7)
    book = ScoreBook.load(path, params=p)
    assert (book.alpha, book.penalty_windows, book.params) == (0.2, 7, p)


def test_simulator_uses_the_validators_own_functions():
    for name in ("ScoreBook", "choose_audits", "compute_weights"):
        assert getattr(incentive_sim, name) is getattr(scoring, name)


def _pop(**over) -> Population:
    base = dict(windows=12, rounds_per_window=3, seed=5, honest={"count": 6, "churn": 0.1},
                cheaters=[CheaterSpec(kind="random", detection=1.0), CheaterSpec(kind="lazy", detection=0.0),
                          CheaterSpec(kind="phantom", detection=1.0, verified_fraction=0.0)],
                sybils=[SybilSpec(hops_per_round=40, split=4)])
    base.update(over)
    return Population.model_validate(base)


def test_simulation_pays_what_the_rules_say():
    s = simulate_incentives.summarise(simulate(_pop()))
    by_kind = {c["kind"]: c for c in s["cheaters"]}
    assert by_kind["random"]["ratio"] == 0.0 and by_kind["random"]["windows_to_zero"] == 1
    assert by_kind["phantom"]["earned"] == 0.0
    assert by_kind["lazy"]["ratio"] == pytest.approx(1.0)  # never caught: paid like its honest twin
    assert s["sybils"][0]["ratio"] == pytest.approx(1.0)
    assert s["share"]["owner (burn)"] == pytest.approx(0.1, abs=1e-9)
    assert sum(s["share"].values()) == pytest.approx(1.0)
    assert s["honest_miners"] > 6  # churn brought newcomers


def test_simulator_cli_reports_a_missed_target_and_bad_input(tmp_path, capsys):
    pop = tmp_path / "pop.yaml"
    pop.write_text("windows: 6\nhonest: {count: 4}\ncheaters:\n  - {kind: stale, detection: 0.0}\n")
    assert simulate_incentives.main([str(pop), "--seeds", "1", "--no-recommend"]) == 1
    out = capsys.readouterr().out
    assert "stale" in out and "FAIL" in out and "targets met: NO" in out
    pop.write_text("windows: 6\ncheaters:\n  - {kind: bribery, detection: 1}\n")
    assert simulate_incentives.main([str(pop)]) == 2
    err = capsys.readouterr().err
    assert "bribery" in err and "Traceback" not in err
    assert simulate_incentives.main([str(pop), "--set", "ema_alpha"]) == 2


def test_recommendation_meets_the_targets_it_claims():
    pop = _pop(cheaters=[CheaterSpec(kind="copy", detection=0.95)], windows=10)
    params, ev = simulate_incentives.recommend(pop, pop.params(), seeds=1)
    assert ev["ok"] and max(ev["worst_cheat"].values()) < simulate_incentives.CHEATER_TARGET
    assert params.audit_fraction in simulate_incentives.GRID["audit_fraction"]


def test_gini():
    assert gini([1, 1, 1, 1]) == 0.0
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)


def test_the_docs_and_the_example_config_state_the_code_defaults():
    """IncentiveParams is the one statement of the defaults: docs/CONSOLE.md's table and
    run.example.yaml's incentives repeat them, and must say the same."""
    import re
    from pathlib import Path

    import yaml
    root = Path(__file__).resolve().parent.parent
    d = IncentiveParams().model_dump()
    section = (root / "docs" / "CONSOLE.md").read_text().split("## Incentive parameters", 1)[1].split("\n## ", 1)[0]
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", section, re.M))
    assert set(table) == set(d)
    scalars = {k: v for k, v in d.items() if isinstance(v, (int, float))}
    assert {k: float(table[k]) for k in scalars} == {k: float(v) for k, v in scalars.items()}
    example = yaml.safe_load((root / "run.example.yaml").read_text())["incentives"]
    assert example and {k: d[k] for k in example} == example

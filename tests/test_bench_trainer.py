"""scripts/bench_trainer.py and scripts/bench_boundary_overhead.py on the CPU at the tiny preset: every
row measured or failed in its row, the baseline computes the same losses, the table comes last."""
from __future__ import annotations

import json

import pytest
import torch

from scripts import bench_boundary_overhead, bench_trainer

torch.set_num_threads(1)


def test_grid_measures_each_variant_and_reports_a_failing_one_in_its_row(tmp_path, capsys):
    out = tmp_path / "grid.json"
    # cudnn attention does not exist on a CPU: that row must fail on its own and the grid go on
    records = bench_trainer.main(["--preset", "tiny", "--device", "cpu", "--warmup", "0", "--steps", "1",
                                  "--variants", "legacy-16k,fast-16k,fast-64k-b16-cudnn", "--no-muon-check",
                                  "--out", str(out)])
    by = {r["run"]["name"]: r for r in records}
    assert set(by) == {"legacy-16k", "fast-16k", "fast-64k-b16-cudnn"}
    assert "error" in by["fast-64k-b16-cudnn"] and "error" not in by["fast-16k"]
    for name in ("legacy-16k", "fast-16k"):
        r = by[name]
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 8 * 2 * 64
        assert r["phase_s_per_step"]["fwd_bwd"] > 0 and r["phase_s_per_step"]["muon"] > 0
        assert sum(r["phase_s_per_step"].values()) <= r["step_s"] * 1.05
    # the old loop and the new one compute the same first step (fused projections round differently)
    assert by["legacy-16k"]["loss_first"] == pytest.approx(by["fast-16k"]["loss_first"], abs=1e-4)
    assert json.loads(out.read_text())["records"][0]["run"]["name"] == "legacy-16k"
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-5].startswith("variant") and lines[-1].startswith("fast-64k-b16-cudnn")
    assert "RuntimeError" in lines[-1]


def test_grid_rejects_unknown_variants_by_name():
    with pytest.raises(SystemExit, match="no-such-variant"):
        bench_trainer.main(["--preset", "tiny", "--device", "cpu", "--variants", "fast-16k,no-such-variant"])


def test_batched_and_torch_muon_agree_on_a_stage():
    res = bench_trainer.muon_agreement(bench_trainer.ModelConfig.preset("tiny"), torch.device("cpu"), 0, {})
    assert res["matrices"] > 0 and res["batched_step_s"] > 0
    assert res["max_rel_update_diff"] < 2e-2  # bf16 Newton-Schulz in both


def test_boundary_overhead_runs_every_setting_against_none(tmp_path, capsys):
    out = tmp_path / "b.json"
    rows = bench_boundary_overhead.main(["--configs", "tiny", "--device", "cpu", "--repeats", "1",
                                         "--warmup", "0", "--steps", "1", "--out", str(out)])
    assert [r["setting"] for r in rows] == list(bench_boundary_overhead.SETTINGS)
    base = rows[0]
    assert base["setting"] == "none" and base["time_overhead"] == [0.0]
    assert all(r["repeats"] == 1 and r["step_s_median"] > 0 for r in rows)
    assert len(json.loads(out.read_text())["records"]) == 4
    table = capsys.readouterr().out.strip().splitlines()[-6:]  # header, rule, 4 rows
    assert table[0].startswith("config") and "postnorm+tok (default)" in table[4]


def test_boundary_summary_compares_each_repeat_with_its_own_baseline():
    def rec(setting, rep, t, peak):
        return {"bench_config": "c", "setting": setting, "repeat": rep, "step_s_median": t, "peak_gib": peak}
    records = [rec("none", 0, 1.0, 10.0), rec("none", 1, 2.0, 10.0),
               rec("postnorm+tok", 0, 1.1, 10.5), rec("postnorm+tok", 1, 2.1, 10.2),
               {"bench_config": "c", "setting": "none+tok", "repeat": 0, "error": "OOM"}]
    rows = bench_boundary_overhead.summarise(records)
    assert [r["setting"] for r in rows] == ["none", "postnorm+tok"]  # the failed run is left out
    pn = rows[1]
    assert pn["time_overhead"] == pytest.approx([0.1, 0.05])
    assert pn["memory_overhead"] == pytest.approx([0.05, 0.02])
    assert pn["step_s_median"] == pytest.approx(1.6) and pn["spread"] == pytest.approx(1.0 / 1.6)

"""The compression benchmark's --tiny CPU smoke run: settings train, results merge into one table."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench_compression.py"
_spec = importlib.util.spec_from_file_location("bench_compression", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_compression", bench)  # dataclasses look their module up by name
_spec.loader.exec_module(bench)

ROWS = "none/muon,resbm@128/muon,naive@128/adamw,none/adamw,resbm@128+int8/adamw"


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench")
    results = bench.main(["--tiny", "--steps", "3", "--only", ROWS, "--out", str(out)])
    return out, results


def test_tiny_run_trains_every_requested_setting_and_writes_json(tiny_results):
    out, results = tiny_results
    assert sorted(r["name"] for r in results) == sorted(ROWS.split(","))
    files = sorted(out.glob("*.json"))
    assert len(files) == len(results)
    for r in results:
        assert r["steps"] == 3 and len(r["train_loss"]) == 3
        assert r["tokens"] == 3 * r["tokens_per_step"]
        assert all(torch.isfinite(torch.tensor(r["val_loss"])))
        assert r["val_steps"][0] == 0 and r["val_steps"][-1] == 3
    loaded = bench.load_results([str(out)])
    assert {r["name"] for r in loaded} == {r["name"] for r in results}


def test_same_init_and_data_give_identical_baseline_start(tiny_results):
    _, results = tiny_results
    by = {r["name"]: r for r in results}
    # Same init seed and the same validation set: the step-0 loss of the two baselines is equal.
    assert by["none/muon"]["val_loss"][0] == pytest.approx(by["none/adamw"]["val_loss"][0], abs=1e-6)


def test_report_computes_gaps_bytes_and_ratio(tiny_results):
    _, results = tiny_results
    rows = {r["name"]: r for r in bench.summarise(results)}
    base, comp = rows["none/muon"], rows["resbm@128/muon"]
    assert base["gap_same"] == pytest.approx(0.0)
    want = (comp["val"] / base["val"] - 1) * 100
    assert comp["gap_same"] == pytest.approx(want)
    assert comp["k"] == 1 and base["k"] == 128
    assert comp["bytes"] < base["bytes"]
    int8 = rows["resbm@128+int8/adamw"]
    assert int8["gap_same"] == pytest.approx((int8["val"] / rows["none/adamw"]["val"] - 1) * 100)
    table = bench.format_table(list(rows.values()))
    assert table.count("\n") == len(rows) + 1 and "resbm@128/muon" in table


def test_report_rejects_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a bench_compression result"):
        bench.load_results([str(bad)])


def test_unknown_setting_name_is_refused():
    with pytest.raises(SystemExit, match="unknown setting"):
        bench.main(["--tiny", "--only", "resbm@7/muon"])


def test_grid_covers_the_issue_and_setting_names_are_unique():
    names = [s.name for s in bench.default_grid()]
    assert len(names) == len(set(names))
    for want in ("none/muon", "none/adamw/s1", "resbm@32/adamw", "resbm@128+fp8/muon",
                 "resbm@128+int8/adamw", "resbm-iota@128/muon", "naive@128/adamw"):
        assert want in names

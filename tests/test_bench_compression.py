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

ROWS = ("none/muon,none+tok/muon,resbm-postnorm@128+tok/muon,resbm@128/muon,naive@128/adamw,none/adamw,"
        "resbm-postnorm@128+int8+tok/adamw")


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
    base, comp = rows["none/muon"], rows["resbm-postnorm@128+tok/muon"]
    # the re-injected baseline is a row of its own, never the baseline of the gaps
    assert rows["none+tok/muon"]["gap_same"] == pytest.approx((rows["none+tok/muon"]["val"] / base["val"] - 1) * 100)
    assert base["gap_same"] == pytest.approx(0.0)
    want = (comp["val"] / base["val"] - 1) * 100
    assert comp["gap_same"] == pytest.approx(want)
    assert comp["k"] == 1 and base["k"] == 128
    assert comp["bytes"] < base["bytes"]
    int8 = rows["resbm-postnorm@128+int8+tok/adamw"]
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
    for want in ("none/muon", "none/adamw/s1", "none+tok/muon", "resbm-postnorm@32+tok/adamw",
                 "resbm-postnorm@128+fp8+tok/muon", "resbm-postnorm@128+int8+tok/adamw",
                 "resbm-postnorm@64+fp8+tok/muon", "resbm-iota@128/muon", "naive@128/adamw",
                 "naive@128+tok/muon", "resbm@128/muon"):
        assert want in names


def _tiny_model(s):
    from resbm.model import build_model
    return build_model(s.model_config("tiny"), seed=0)


def test_round2_names_are_distinct_and_plain_resbm_keeps_the_first_round_variant():
    plain = bench.Setting("resbm")
    assert plain.model_config("tiny").boundary_variant == "normed"
    names = {bench.Setting("resbm", enc_lr=2, dec_lr=2).name, bench.Setting("resbm", e_init=0).name,
             bench.Setting("resbm", d_init=0.02).name, bench.Setting("resbm", dec_mod="postnorm").name,
             plain.name}
    assert names == {"resbm@128+elr2+dlr2/muon", "resbm@128+einit0/muon", "resbm@128+dinit0.02/muon",
                     "resbm@128+postnorm/muon", "resbm@128/muon"}


def test_round2_init_changes_take_effect():
    torch.manual_seed(0)
    base = _tiny_model(bench.Setting("resbm"))
    m = _tiny_model(bench.Setting("resbm"))
    bench.apply_round2(m, bench.Setting("resbm", e_init=0.0, d_init=0.02))
    for b0, b in zip(base.boundaries.values(), m.boundaries.values()):
        assert b0.encoder.proj.weight.abs().sum() > 0 and b.encoder.proj.weight.abs().sum() == 0
        assert b0.decoder.proj.weight.abs().sum() == 0
        assert b.decoder.proj.weight.std().item() == pytest.approx(0.02, rel=0.5)


@pytest.mark.parametrize("mode", ["idgain", "dgain", "outgain", "postnorm"])
def test_decoder_variants_start_as_documented(mode):
    cfg = bench.Setting("resbm").model_config("tiny")
    m = _tiny_model(bench.Setting("resbm"))
    plain = m.boundaries["0"].decoder
    mod = bench.ModDecoder(plain, mode, cfg)
    z = torch.randn(2, 3, cfg.code_dim)
    out, ref = mod(z), plain(z)
    if mode == "postnorm":  # unit RMS over d channels at gain 1
        assert torch.allclose(out.pow(2).mean(-1), torch.ones(2, 3), atol=2e-2)  # eps: not exactly 1
        assert not torch.allclose(out, ref)
    else:  # every gain starts at 1: identical to the plain decoder
        assert torch.allclose(out, ref)
    (out * torch.randn_like(out)).sum().backward()
    assert plain.proj.weight.grad.abs().sum() > 0
    if mode == "dgain":  # D starts at zero, so its gain gets no gradient until D has grown
        assert mod.gain.grad.abs().sum() == 0
    else:
        assert mod.gain.grad.abs().sum() > 0


def test_boundary_lr_multipliers_make_their_own_muon_groups():
    from resbm.optim import build_optimizer
    s = bench.Setting("resbm", enc_lr=4.0, dec_lr=0.5)
    m = _tiny_model(s)
    opt = build_optimizer(m, bench._optim_config(s, 10))
    n_muon = sum(len(g["params"]) for g in opt.optimizers["muon"].param_groups)
    bench.split_boundary_lr(opt, m, s)
    groups = opt.optimizers["muon"].param_groups
    assert len(groups) == 3 and sum(len(g["params"]) for g in groups) == n_muon
    opt.set_lr(5)
    enc_ids = {id(b.encoder.proj.weight) for b in m.boundaries.values()}
    assert {id(p) for p in groups[1]["params"]} == enc_ids
    assert groups[1]["lr"] == pytest.approx(4 * groups[0]["lr"])
    assert groups[2]["lr"] == pytest.approx(0.5 * groups[0]["lr"])


def test_round2_options_are_refused_where_they_do_not_apply():
    m = _tiny_model(bench.Setting("resbm"))
    with pytest.raises(ValueError, match="dec_mod must be one of"):
        bench.apply_round2(m, bench.Setting("resbm", dec_mod="gated"))
    with pytest.raises(ValueError, match="need boundary 'resbm'"):
        bench.apply_round2(m, bench.Setting("naive", e_init=2.0))
    with pytest.raises(ValueError, match="need opt 'muon'"):
        bench.apply_round2(m, bench.Setting("resbm", opt="adamw", enc_lr=2.0))


def test_tiny_run_with_round2_options_trains(tmp_path):
    extra = '[{"boundary":"resbm","dec_mod":"postnorm","enc_lr":0.5,"dec_lr":0.5,"d_init":0.02}]'
    res = bench.main(["--tiny", "--steps", "2", "--extra", extra, "--only",
                      "resbm@128+elr0.5+dlr0.5+dinit0.02+postnorm/muon", "--out", str(tmp_path)])
    assert len(res) == 1 and res[0]["steps"] == 2
    assert all(torch.isfinite(torch.tensor(res[0]["val_loss"])))
    assert res[0]["setting"]["dec_mod"] == "postnorm"


def test_library_postnorm_variant_computes_what_the_bench_measured():
    from resbm.boundary_kinds import build_boundary
    cfg = bench.Setting("resbm", variant="postnorm").model_config("tiny")
    lib = build_boundary(cfg)
    bench_dec = bench.ModDecoder(build_boundary(bench.Setting("resbm").model_config("tiny")).decoder,
                                 "postnorm", cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        bench_dec.inner.proj.weight.normal_()
        lib.decoder.proj.weight.copy_(bench_dec.inner.proj.weight)
        bench_dec.gain.uniform_(0.5, 1.5)
        lib.decoder.norm.weight.copy_(bench_dec.gain)
    z = torch.randn(2, 5, cfg.code_dim)
    assert torch.allclose(lib.decoder(z), bench_dec(z), atol=1e-6)


def test_grid_rows_build_the_library_default_and_plain_rows_have_no_reinjection():
    from resbm.config import ModelConfig
    default = ModelConfig(**bench.SIZES["tiny"]["model"])
    by = {s.name: s for s in bench.default_grid()}
    cfg = by["resbm-postnorm@128+tok/muon"].model_config("tiny")
    assert (cfg.boundary, cfg.boundary_variant, cfg.token_reinject) == (
        default.boundary, default.boundary_variant, default.token_reinject)
    for name in ("none/muon", "resbm@128/muon", "naive@128/adamw", "resbm-iota@128/muon"):
        assert by[name].model_config("tiny").token_reinject is False
    low = bench.Setting("resbm", variant="postnorm", token_reinject=True, tok_rank=8)
    assert low.name == "resbm-postnorm@128+tok8/muon" and low.model_config("tiny").token_reinject is False


def test_recomputing_the_boundaries_changes_nothing_but_memory(tmp_path):
    torch.set_num_threads(1)
    extra = '[{"boundary":"resbm","variant":"postnorm","token_reinject":true,"ckpt":true}]'
    res = {r["name"]: r for r in bench.main(["--tiny", "--steps", "3", "--extra", extra, "--only",
                                             "resbm-postnorm@128+tok/muon,resbm-postnorm@128+tok+ckpt/muon"])}
    plain, ckpt = res["resbm-postnorm@128+tok/muon"], res["resbm-postnorm@128+tok+ckpt/muon"]
    assert plain["train_loss"] == pytest.approx(ckpt["train_loss"], abs=1e-6)
    assert plain["val_loss"] == pytest.approx(ckpt["val_loss"], abs=1e-6)

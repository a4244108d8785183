"""Calibrated audit tolerances: choosing the replay numerics, picking the entry that matches what a
replay is (model, numerics, GPUs, inner steps), deriving thresholds, and the calibration script."""
from __future__ import annotations

import math

import pytest
import torch
import yaml
from pydantic import ValidationError

from neurons.audit import DEFAULT_TOLERANCES, GROSS_TOLERANCES, HopRecord, ReplaySettings, Tolerances, replay_round
from neurons.audit_calibration import CalibrationKey, HopError, derive_tolerances, honest_spread, passes, separation
from neurons.audit_tolerances import AuditContext, record_gpu, record_numerics, replay_numerics, stage_tolerances
from protocol.audit_tolerances import AuditTolerance
from protocol.messages import HopRecord as WireRecord, RegisterRequest
from scripts.calibrate_audit import analyse


MODEL = "0123456789abcdef"


def _tol(**kw) -> AuditTolerance:
    base = dict(model=MODEL, miner="cuda/bfloat16", replay="cuda/bfloat16", kind="bwd", rel_err=0.3,
                min_cosine=0.9, norm_ratio=0.1)
    return AuditTolerance(**(base | kw))


def _ctx(miner=("cuda", "bfloat16"), replay=("cuda", "bfloat16"), model=MODEL, miner_gpu="NVIDIA H100",
         replay_gpu="NVIDIA H100") -> AuditContext:
    return AuditContext(model=model, miner=miner, miner_gpu=miner_gpu, replay=replay, replay_gpu=replay_gpu)


def test_replay_numerics_like_for_like_when_the_validator_has_the_device():
    assert replay_numerics(("cuda", "bfloat16"), "cuda") == ("cuda", "bfloat16")
    assert replay_numerics(("cuda", "bfloat16"), "cuda:1") == ("cuda:1", "bfloat16")
    assert replay_numerics(("cuda", "bfloat16"), "cpu") == ("cpu", "float32")  # no GPU: fp32 on its own device
    assert replay_numerics(("cpu", "bfloat16"), "cuda") == ("cpu", "bfloat16")  # CPU miners: CPU replay, exact
    assert replay_numerics(("mps", "float16"), "cuda") == ("cuda", "float32")


def test_most_specific_entry_wins_and_uncovered_kinds_are_uncalibrated():
    entries = [_tol(miner="*", replay="*", rel_err=0.5), _tol(rel_err=0.4), _tol(stage=2, rel_err=0.6),
               _tol(kind="pseudograd", rel_err=0.2, min_cosine=0.97), _tol(replay="cpu/float32", rel_err=0.9)]
    look = lambda ctx, stage, kind: stage_tolerances(entries, ctx, stage).lookup(kind, 0)  # noqa: E731
    assert look(_ctx(), 2, "bwd") == (Tolerances(rel_err=0.6, min_cosine=0.9, norm_ratio=0.1), True)
    assert look(_ctx(), 1, "bwd")[0].rel_err == 0.4
    assert look(_ctx(replay=("cpu", "float32"), replay_gpu=""), 1, "bwd")[0].rel_err == 0.9
    assert look(_ctx(miner=("mps", "float16"), replay=("cpu", "float32")), 1, "bwd")[0].rel_err == 0.5
    pg = look(_ctx(), 1, "pseudograd")[0]
    assert (pg.pg_rel_err, pg.pg_min_cosine) == (0.2, 0.97)
    assert look(_ctx(), 1, "fwd") == (GROSS_TOLERANCES, False)  # no fwd entry: not trusted
    # the one built-in calibration: a CPU miner replayed on a CPU in its own dtype
    assert look(_ctx(("cpu", "bfloat16"), ("cpu", "bfloat16"), "*", "", ""), 0, "fwd") == (DEFAULT_TOLERANCES, True)
    assert look(_ctx(("cuda", "bfloat16"), ("cpu", "float32"), "*", "", ""), 0, "fwd") == (GROSS_TOLERANCES, False)


def test_an_entry_applies_only_to_the_model_gpus_and_inner_steps_it_was_calibrated_on():
    entries = [_tol(miner_gpu="NVIDIA H200", replay_gpu="NVIDIA H200", step_to=7, rel_err=0.25)]
    h200 = _ctx(miner_gpu="NVIDIA H200", replay_gpu="NVIDIA H200")
    assert stage_tolerances(entries, h200, 1).lookup("bwd", 7) == (Tolerances(rel_err=0.25, min_cosine=0.9,
                                                                               norm_ratio=0.1), True)
    assert stage_tolerances(entries, h200, 1).lookup("bwd", 8) == (GROSS_TOLERANCES, False)  # H = 32 > 8
    assert stage_tolerances(entries, _ctx(), 1).lookup("bwd", 0)[1] is False  # H100 miner: another GPU
    other_model = _ctx(model="fedcba9876543210", miner_gpu="NVIDIA H200", replay_gpu="NVIDIA H200")
    assert stage_tolerances(entries, other_model, 1).lookup("bwd", 0)[1] is False  # d 1024 entries, 1B run
    anymodel = [_tol(model="*", miner_gpu="*", replay_gpu="*")]  # an owner's deliberate wildcard
    assert stage_tolerances(anymodel, other_model, 1).lookup("bwd", 30)[1] is True
    with pytest.raises(ValidationError):
        AuditTolerance(miner="cuda/bfloat16", replay="cuda/bfloat16", kind="bwd", rel_err=0.3, min_cosine=0.9,
                       norm_ratio=0.1)  # no model: an entry must say what it was calibrated on
    with pytest.raises(ValidationError):
        _tol(step_from=4, step_to=2)
    with pytest.raises(ValidationError):
        _tol(model="d1024")


def test_declared_numerics_default_to_cpu_fp32_and_must_agree():
    assert RegisterRequest().device_class == "cpu" and RegisterRequest().compute_dtype == "float32"
    with pytest.raises(ValidationError):
        RegisterRequest(device_class="tpu")
    assert RegisterRequest(device_name="NVIDIA H100 80GB HBM3").device_name == "NVIDIA H100 80GB HBM3"
    for bad in ("x" * 65, "GPU\n<script>", "A100; rm -rf"):
        with pytest.raises(ValidationError):
            RegisterRequest(device_name=bad)
    base = dict(hop_id="h1", sample_id=0, round=0, stage=0, kind="fwd", inner_step=0, recompute=False,
                miner_hotkey="5" + "a" * 47, leased_at=0.0, done_at=1.0)
    old = WireRecord(**base)
    gpu = WireRecord(**(base | {"hop_id": "h2", "device_class": "cuda", "compute_dtype": "bfloat16"}))
    assert record_numerics([old]) == ("cpu", "float32") and record_numerics([gpu]) == ("cuda", "bfloat16")
    with pytest.raises(ValueError, match="several numerics"):
        record_numerics([old, gpu])
    h100 = WireRecord(**(base | {"hop_id": "h3", "device_name": "NVIDIA H100 80GB HBM3"}))
    assert record_gpu([old]) == "" and record_gpu([h100]) == "NVIDIA H100 80GB HBM3"
    with pytest.raises(ValueError, match="several GPU models"):
        record_gpu([old, h100])
    with pytest.raises(ValidationError):
        _tol(miner="cuda/int4")


def test_tolerances_from_the_honest_spread_pass_honest_and_fail_cheats():
    honest = [HopError(1, "bwd", r, 1 - r * r / 2, 1 + r / 3, step=s) for s, r in enumerate((0.0, 0.01, 0.04))]
    honest += [HopError(3, "fwdbwd", 0.02, 0.9998, 1.0, loss_diff=0.003, step=1)]
    spread = honest_spread(honest, steps_per_round=4)
    key = CalibrationKey("cuda/bfloat16", "cuda/bfloat16", MODEL, "NVIDIA H100", "NVIDIA H100")
    table = {(t.stage, t.kind): t for t in derive_tolerances(spread, key, margin=3)}
    assert {(t.step_from, t.step_to, t.model, t.miner_gpu) for t in table.values()} == {(0, 3, MODEL, "NVIDIA H100")}
    assert table[(1, "bwd")].rel_err == pytest.approx(0.12) and table[(3, "fwdbwd")].loss_abs == pytest.approx(0.009)
    assert all(passes(e, table[(e.stage, e.kind)]) for e in honest)
    assert not passes(HopError(1, "bwd", 0.2, 0.98, 1.0), table[(1, "bwd")])
    assert not passes(HopError(3, "fwdbwd", 0.0, 1.0, 1.0, loss_diff=0.05), table[(3, "fwdbwd")])
    assert not passes(HopError(1, "bwd", 0.0, missing=True), table[(1, "bwd")])
    assert separation([HopError(1, "bwd", 0.01), HopError(1, "bwd", 0.4)], spread, 4) == pytest.approx(10.0)
    assert separation([HopError(1, "bwd", 0.0, missing=True)], spread, 4) == math.inf


def test_analyse_counts_held_out_false_positives_and_writes_run_config_yaml(tmp_path):
    def hop(s, k, r):
        return {"stage": s, "kind": k, "rel_err": r, "cosine": 1.0, "norm_ratio": 1.0, "loss_diff": 0.0, "missing": False}
    rounds = [[hop(0, "fwd", 0.01)], [hop(0, "fwd", 0.012)], [hop(0, "fwd", 0.05)], [hop(0, "fwd", 0.011)]]
    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16, "n_stages": 2, "bottleneck_dim": 4}
    report = {"miner": "cuda/bfloat16", "config": {"inner_steps": 4, "model": model},  # an older raw file: no keys
              "honest": {"cuda/bfloat16": rounds}, "cheat_errors": {"lazy": [[hop(0, "fwd", 1.0)]]}}
    out = tmp_path / "tol.yaml"
    summary = analyse(report, 3.0, str(out), gpu="NVIDIA H200")
    # fit on rounds 0-1 (max 0.012 -> tol 0.036): round 2's 0.05 is a held-out false positive
    assert summary["classes"]["cuda/bfloat16"]["held_out"] == [[1, 2], [0, 2]]
    assert summary["cheats"]["lazy"] == {"audits": 1, "min_separation": pytest.approx(20.0), "caught": 1}
    from protocol.run_config import RunConfig
    entries = yaml.safe_load(out.read_text())["audit_tolerances"]
    assert RunConfig.model_fields["audit_tolerances"].annotation == list[AuditTolerance]
    assert [AuditTolerance(**e).rel_err for e in entries] == [pytest.approx(0.15)]
    from resbm.config import ModelConfig
    e = AuditTolerance(**entries[0])
    assert (e.model, e.miner_gpu, e.replay_gpu, e.step_from, e.step_to) == (
        ModelConfig.from_dict(model).config_hash(), "NVIDIA H200", "NVIDIA H200", 0, 3)


def test_replay_uses_the_tolerance_of_each_hop_kind():
    from neurons.stage_worker import StageWorker
    from resbm import data, optim
    from resbm.config import ModelConfig
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8, n_stages=2, bottleneck_dim=4, vocab_size=data.VOCAB_SIZE)
    ocfg = optim.OptimConfig(warmup_steps=0, total_steps=100)
    miner = StageWorker(cfg, 0, 2, ocfg)
    theta = miner.theta()
    tokens, _ = data.batch(0, 0, 1, 8)
    out = miner.forward(0, tokens)
    rec = HopRecord(0, "fwd", 0, claimed_output=out * 1.02)  # 2% off: between the two thresholds
    settings = ReplaySettings(round_index=0, inner_steps_per_round=1, data_seed=0, batch_size=1)
    loose = {"fwd": Tolerances(rel_err=0.05, norm_ratio=0.05)}
    tight = {"fwd": Tolerances(rel_err=0.01, norm_ratio=0.05)}
    make = lambda: StageWorker(cfg, 0, 2, ocfg)  # noqa: E731
    assert replay_round(make, theta, [rec], settings, tolerances=loose).passed
    assert replay_round(make, theta, [rec], settings, tolerances=tight).failed
    assert torch.equal(out, miner.forward(1, tokens))  # the miner is deterministic on CPU


def test_calibration_end_to_end_on_a_tiny_cpu_model(tmp_path):
    from scripts.calibrate_audit import main
    out = tmp_path / "tol.yaml"
    summary = main(["--size", "micro", "--device", "cpu", "--rounds", "2", "--inner-steps", "1", "--micro", "2",
                    "--batch", "1", "--pretrain-steps", "2", "--cheat-rounds", "1", "--miner-dtype", "bfloat16",
                    "--replay-dtype", "float32", "--out", str(out)])
    # 2 samples (copy needs an earlier hop to copy), each: stage 0 fwd, stage 1 fwdbwd (stage 0 bwd
    # uploads nothing); one pseudo-gradient per stage and round
    assert summary["classes"]["cpu/float32"]["hops"] == 2 * (2 * 2 + 2)
    assert {k: v["caught"] for k, v in summary["cheats"].items()} == {k: 2 for k in
                                                                       ("random", "stale", "copy", "lazy", "phantom")}
    entries = [AuditTolerance(**e) for e in yaml.safe_load(out.read_text())["audit_tolerances"]]
    from scripts.calibrate_audit import SIZES
    from resbm.config import ModelConfig
    assert {(e.miner, e.replay, e.miner_gpu, e.replay_gpu, e.model, e.step_from, e.step_to) for e in entries} == {
        ("cpu/bfloat16", "cpu/float32", "", "", ModelConfig.from_dict(SIZES["micro"]).config_hash(), 0, 0)}
    assert {(e.stage, e.kind) for e in entries} >= {(0, "fwd"), (1, "fwdbwd"), (0, "pseudograd"), (1, "pseudograd")}


def test_the_1b_preset_is_the_gpu_subnet_model():
    from resbm.config import PRESETS, ModelConfig
    from scripts.calibrate_audit import SIZES
    cfg = ModelConfig.from_dict(SIZES["1b"])
    assert SIZES["1b"] == PRESETS["1b"]
    assert (cfg.d_model, cfg.n_layers, cfg.n_stages) == (2048, 20, 4)

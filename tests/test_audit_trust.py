"""Calibrated or not trusted, confirmed before penalised: replays judged by tolerances keyed to what
they were calibrated on (uncalibrated hops give no verdict unless grossly wrong), and a failure on
numbers replayed once more before it counts. The validator's non-deterministic GPU replay is a
`StageWorker` subclass that perturbs one hop's output on chosen replays (a fault fixture)."""
from __future__ import annotations

import math

import pytest
import torch

from neurons.audit import HopRecord, ReplaySettings, Tolerances, replay_round
from neurons.audit_confirm import NOISE_MARGIN, confirm_failure
from neurons.audit_tolerances import AuditContext, stage_tolerances
from neurons.round_audit import combine
from neurons.stage_worker import StageWorker
from protocol.audit_tolerances import AuditTolerance
from resbm import data
from resbm.config import ModelConfig
from resbm.optim import OptimConfig

CFG = ModelConfig(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=2, n_heads=2, seq_len=16,
                  n_stages=2, bottleneck_dim=4, wire_codec="bf16")
SETTINGS = ReplaySettings(round_index=0, inner_steps_per_round=2, data_seed=5, batch_size=2, wire_codec="bf16")
GPU_MINER = AuditContext(model=CFG.config_hash(), miner=("cuda", "bfloat16"), miner_gpu="NVIDIA H100 80GB HBM3",
                         replay=("cuda", "bfloat16"), replay_gpu="NVIDIA H100 80GB HBM3")
TIGHT = Tolerances(rel_err=0.01, min_cosine=0.999, norm_ratio=0.01)


class FlakyReplay(StageWorker):
    """A replay whose forward of sample `sample` lands `noise[k]` (relative) off on its k-th replay."""

    def __init__(self, noise: dict[int, float], sample: int = 2):
        super().__init__(CFG, 0, 2, OptimConfig(warmup_steps=0, total_steps=10), init_seed=9)
        self.noise, self.sample, self.replays = noise, sample, 0

    def load_theta(self, theta) -> None:
        self.replays += 1  # replay_round loads the round's start state once per replay
        super().load_theta(theta)

    def forward(self, sample_id, inp, tokens=None):
        out = super().forward(sample_id, inp, tokens)
        eps = self.noise.get(self.replays, 0.0)
        if sample_id == self.sample and eps:
            gen = torch.Generator().manual_seed(self.replays)
            d = torch.randn(out.shape, generator=gen)
            out = out + eps * out.norm() * d / d.norm()
        return out


def _miner() -> StageWorker:
    return StageWorker(CFG, 0, 2, OptimConfig(warmup_steps=0, total_steps=10), init_seed=9)


@pytest.fixture(scope="module")
def honest():
    """Stage 0 of an honest miner: two inner steps of two samples, forward and backward."""
    torch.set_num_threads(1)
    w = _miner()
    theta, records, gen = w.theta(), [], torch.Generator().manual_seed(0)
    for step, sids in enumerate(((1, 2), (3, 4))):
        for sid in sids:
            tokens, _ = data.batch(SETTINGS.data_seed, sid, SETTINGS.batch_size, CFG.seq_len)
            records.append(HopRecord(sample_id=sid, kind="fwd", inner_step=step, claimed_output=w.forward(sid, tokens)))
        for sid in sids:
            grad = torch.randn(tuple(CFG.code_shape(SETTINGS.batch_size)), generator=gen)
            w.backward(sid, grad)
            records.append(HopRecord(sample_id=sid, kind="bwd", inner_step=step, grad=grad))
        w.inner_step(step)
    return theta, records, w.pseudo_gradient(theta)


def _off(records, sample: int, scale: float, kind: str = "fwd"):
    """The records with one hop's claim moved by `scale` relative (in a random direction)."""
    out = []
    for r in records:
        c = r.claimed_output
        if r.sample_id == sample and r.kind == kind and c is not None:
            d = torch.randn(c.shape, generator=torch.Generator().manual_seed(99))
            c = c + scale * c.norm() * d / d.norm()
        out.append(HopRecord(r.sample_id, r.kind, r.inner_step, inputs=r.inputs, grad=r.grad, claimed_output=c))
    return out


def _entry(**kw) -> AuditTolerance:
    base = dict(model=GPU_MINER.model, miner="cuda/bfloat16", replay="cuda/bfloat16", miner_gpu=GPU_MINER.miner_gpu,
                replay_gpu=GPU_MINER.replay_gpu, kind="fwd", rel_err=0.01, min_cosine=0.999, norm_ratio=0.01)
    return AuditTolerance(**(base | kw))


def test_an_uncalibrated_combination_withholds_its_verdict_but_gross_errors_still_fail(honest):
    theta, records, pg = honest
    table = stage_tolerances([], GPU_MINER, 0)  # nothing calibrated for this model on this GPU
    off = replay_round(_miner, theta, _off(records, 3, 0.10), SETTINGS, claimed_pseudo_grad=pg, tolerances=table)
    assert off.status == "uncalibrated" and not off.failed and not off.passed
    assert off.uncalibrated == len(off.hops) + 1 and "no calibrated tolerance" in off.reason
    assert "NVIDIA H100" in off.context and GPU_MINER.model in off.context
    cheat = replay_round(_miner, theta, _off(records, 3, 1.4), SETTINGS, claimed_pseudo_grad=pg, tolerances=table)
    assert cheat.failed and "gross bounds" in cheat.reason
    lazy = {n: torch.zeros_like(t) for n, t in pg.items()}  # skipped every step: caught even uncalibrated
    assert replay_round(_miner, theta, records, SETTINGS, claimed_pseudo_grad=lazy, tolerances=table).failed


def test_hops_past_the_calibrated_inner_steps_are_judged_as_uncalibrated(honest):
    theta, records, _ = honest
    table = stage_tolerances([_entry(step_to=0)], GPU_MINER, 0)  # calibrated at H = 1 only
    early = replay_round(_miner, theta, _off(records, 1, 0.10), SETTINGS, tolerances=table)
    late = replay_round(_miner, theta, _off(records, 3, 0.10), SETTINGS, tolerances=table)
    assert early.failed and early.first_failure.inner_step == 0  # 10% > the calibrated 1%
    assert late.status == "uncalibrated"  # step 1 was never calibrated: no penalty on it


def test_a_numerical_outlier_of_one_replay_is_replayed_again_and_not_penalised(honest):
    theta, records, _ = honest
    worker = FlakyReplay({1: 0.2})  # the first replay's kernels went astray at sample 2
    run = lambda: replay_round(lambda: worker, theta, records, SETTINGS, tolerances=TIGHT)  # noqa: E731
    first = run()
    assert first.failed and first.first_failure.sample_id == 2 and first.first_failure.numeric
    report = confirm_failure(first, run)
    assert report.passed and worker.replays == 2 and "numerical outlier, not penalised" in report.reason


def test_replays_as_far_apart_as_the_claim_are_inconclusive(honest):
    theta, records, _ = honest
    worker = FlakyReplay({1: 0.05, 2: 0.05})  # this hop replays differently every time
    claim = _off(records, 2, 0.06)
    run = lambda: replay_round(lambda: worker, theta, claim, SETTINGS, tolerances=TIGHT)  # noqa: E731
    report = confirm_failure(run(), run)
    assert report.status == "inconclusive" and not report.failed, report.reason
    assert "own two replays differ" in report.reason


def test_a_cheat_fails_both_replays_and_is_confirmed(honest):
    theta, records, _ = honest
    worker = FlakyReplay({1: 0.05, 2: 0.05})
    claim = _off(records, 2, 1.0)  # far outside the replays' own noise
    run = lambda: replay_round(lambda: worker, theta, claim, SETTINGS, tolerances=TIGHT)  # noqa: E731
    report = confirm_failure(run(), run)
    assert report.failed and "confirmed by a second replay" in report.reason
    assert report.first_failure.rel_err > NOISE_MARGIN * 0.1


def test_a_deterministic_failure_is_not_replayed_again(honest):
    theta, records, _ = honest
    missing = [HopRecord(r.sample_id, r.kind, r.inner_step, grad=r.grad,
                         claimed_output=None if r.sample_id == 3 and r.kind == "fwd" else r.claimed_output)
               for r in records]
    worker = FlakyReplay({})
    run = lambda: replay_round(lambda: worker, theta, missing, SETTINGS, tolerances=TIGHT)  # noqa: E731
    report = confirm_failure(run(), run)
    assert report.failed and "missing claimed output" in report.reason and worker.replays == 1


def test_on_a_cpu_a_failure_replays_identically_and_is_confirmed(honest):
    theta, records, _ = honest
    run = lambda: replay_round(_miner, theta, _off(records, 4, 0.03), SETTINGS, tolerances=TIGHT)  # noqa: E731
    report = confirm_failure(run(), run)
    assert report.failed and "confirmed" in report.reason
    assert math.isclose(report.first_failure.rel_err, 0.03, rel_tol=0.3)


def test_epochs_combine_to_the_most_severe_outcome(honest):
    theta, records, pg = honest
    ok = replay_round(_miner, theta, records, SETTINGS, tolerances=TIGHT)
    unc = replay_round(_miner, theta, records, SETTINGS, tolerances=stage_tolerances([], GPU_MINER, 0))
    bad = replay_round(_miner, theta, _off(records, 1, 0.5), SETTINGS, tolerances=TIGHT)
    assert (ok.status, unc.status, bad.status) == ("passed", "uncalibrated", "failed")
    assert combine([ok, unc]).status == "uncalibrated" and combine([unc, bad, ok]).status == "failed"

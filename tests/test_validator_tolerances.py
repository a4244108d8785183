"""The pseudo-gradient cosine tolerance, on both sides of it (tests/test_audit.py covers the hop
tolerances and the pseudo-gradient's relative error; a rotation at unchanged norm isolates the cosine)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from neurons.audit import DEFAULT_TOLERANCES, HopRecord, ReplaySettings, replay_round
from neurons.stage_worker import StageWorker
from resbm import data
from resbm.config import ModelConfig
from resbm.optim import OptimConfig

CFG = ModelConfig(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=2, n_heads=2, seq_len=16,
                  n_stages=2, bottleneck_dim=4, wire_codec="bf16")
SETTINGS = ReplaySettings(round_index=0, inner_steps_per_round=1, data_seed=5, batch_size=2, wire_codec="bf16")


def _worker() -> StageWorker:
    return StageWorker(CFG, 0, 2, OptimConfig(warmup_steps=0, total_steps=10), init_seed=9)


@pytest.fixture(scope="module")
def honest_round():
    """Stage 0, two samples forward and backward, one inner step: records and the true pseudo-gradient."""
    torch.set_num_threads(1)
    w = _worker()
    theta = w.theta()
    gen = torch.Generator().manual_seed(0)
    records = []
    for sid in (1, 2):
        tokens, _ = data.batch(SETTINGS.data_seed, sid, SETTINGS.batch_size, CFG.seq_len)
        out = w.forward(sid, tokens)
        records.append(HopRecord(sample_id=sid, kind="fwd", inner_step=0, claimed_output=out))
    for sid in (1, 2):
        grad = torch.randn(tuple(CFG.code_shape(SETTINGS.batch_size)), generator=gen)
        w.backward(sid, grad)
        records.append(HopRecord(sample_id=sid, kind="bwd", inner_step=0, grad=grad))
    w.inner_step(0)
    return theta, records, w.pseudo_gradient(theta)


def _rotated(pg: dict, cos: float) -> dict:
    names = sorted(pg)
    flat = torch.cat([pg[n].double().reshape(-1) for n in names])
    noise = torch.randn(flat.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise -= (noise @ flat) / (flat @ flat) * flat
    moved = cos * flat + math.sqrt(1 - cos * cos) * flat.norm() * noise / noise.norm()
    out, off = {}, 0
    for n in names:
        k = pg[n].numel()
        out[n] = moved[off:off + k].reshape(pg[n].shape).float()
        off += k
    return out


def test_honest_pseudo_gradient_passes_exactly(honest_round):
    theta, records, pg = honest_round
    report = replay_round(_worker, theta, records, SETTINGS, claimed_pseudo_grad=pg)
    assert report.passed, report.reason
    assert report.pseudo_grad.rel_err == 0.0


def test_pseudo_grad_cosine_tolerance_both_sides(honest_round):
    theta, records, pg = honest_round
    tol = replace(DEFAULT_TOLERANCES, pg_rel_err=10.0)  # a rotation at equal norm: only the cosine can fail
    limit = DEFAULT_TOLERANCES.pg_min_cosine
    for cos, ok in ((limit + 0.005, True), (limit - 0.005, False)):
        report = replay_round(_worker, theta, records, SETTINGS, claimed_pseudo_grad=_rotated(pg, cos),
                              tolerances=tol)
        assert report.passed is ok, (cos, report.reason)
        assert report.pseudo_grad.cosine == pytest.approx(cos, abs=1e-4)
        assert report.pseudo_grad.norm_ratio == pytest.approx(1.0, abs=1e-4)
    assert "cosine" in report.reason


def test_pseudo_grad_with_missing_tensor_fails_with_its_name(honest_round):
    theta, records, pg = honest_round
    partial = dict(pg)
    dropped = sorted(partial)[0]
    del partial[dropped]
    report = replay_round(_worker, theta, records, SETTINGS, claimed_pseudo_grad=partial)
    assert report.failed and dropped in report.reason

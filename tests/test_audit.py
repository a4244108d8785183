"""Replay audits: honest miners pass (other thread count, bf16 autocast); cheaters fail; every
tolerance is tested just inside and just outside; time limit gives 'incomplete'."""
import math
from dataclasses import replace

import pytest
import torch

from neurons.audit import DEFAULT_TOLERANCES, HopRecord, ReplaySettings, compare_tensors, replay_round
from neurons.stage_worker import StageWorker
from resbm import codec, data
from resbm.config import ModelConfig
from resbm.optim import OptimConfig

S = 3
B = 2
STEPS = 3
PER_STEP = 2
ROUND = 1
CFG = ModelConfig(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=3, n_heads=2, seq_len=16,
                  n_stages=S, bottleneck_dim=4, wire_codec="bf16")
OCFG = OptimConfig(warmup_steps=0, total_steps=100)
SETTINGS = ReplaySettings(round_index=ROUND, inner_steps_per_round=STEPS, data_seed=3, batch_size=B, wire_codec="bf16")



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def _factory(stage: int, dtype=torch.float32):
    return lambda: StageWorker(CFG, stage, S, OCFG, dtype=dtype, init_seed=11)


def simulate(stage: int, miner_dtype=torch.float32, threads: int | None = None, skip_step: int | None = None,
             data_seed: int = 3):
    """Run a 3-stage pipeline for one round; return (theta_start, records of `stage`, its pseudo-grad).

    The audited stage may run in another dtype / thread count, or skip the step after inner step
    `skip_step` (a stale-weights cheater)."""
    old = torch.get_num_threads()
    workers = [_factory(s, miner_dtype if s == stage else torch.float32)() for s in range(S)]
    theta_start = workers[stage].theta()
    records: list[HopRecord] = []
    try:
        for step in range(STEPS):
            for j in range(PER_STEP):
                sid = step * PER_STEP + j
                tokens, targets = data.batch(data_seed, sid, B, CFG.seq_len)
                x = tokens
                for s in range(S - 1):
                    torch.set_num_threads(threads if threads and s == stage else old)
                    out = workers[s].forward(sid, x, tokens)  # stages > 0 re-inject the tokens
                    if s == stage:
                        records.append(HopRecord(sid, "fwd", step, inputs=None if s == 0 else x, claimed_output=out))
                    x = out
                torch.set_num_threads(threads if threads and stage == S - 1 else old)
                loss, g = workers[-1].forward_backward(sid, x, targets, tokens)
                g = codec.roundtrip(g, CFG.wire_codec)
                if stage == S - 1:
                    records.append(HopRecord(sid, "fwdbwd", step, inputs=x, claimed_output=g, claimed_loss=loss))
                for s in reversed(range(S - 1)):
                    torch.set_num_threads(threads if threads and s == stage else old)
                    gi = workers[s].backward(sid, g)
                    gi = None if gi is None else codec.roundtrip(gi, CFG.wire_codec)
                    if s == stage:
                        records.append(HopRecord(sid, "bwd", step, grad=g, claimed_output=gi))
                    g = gi
            for s, w in enumerate(workers):
                if s == stage and step == skip_step:
                    w.load_theta(w.theta())  # drops the gradients without stepping
                else:
                    w.inner_step(ROUND * STEPS + step)
        return theta_start, records, workers[stage].pseudo_gradient(theta_start)
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def honest():
    return {s: simulate(s) for s in range(S)}


def _audit(stage, theta, records, pg=None, tol=DEFAULT_TOLERANCES, max_seconds=60.0):
    return replay_round(_factory(stage), theta, records, SETTINGS, max_seconds=max_seconds,
                        claimed_pseudo_grad=pg, tolerances=tol)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_honest_fp32_miner_passes_bit_exactly(honest, stage):
    theta, records, pg = honest[stage]
    report = _audit(stage, theta, records, pg)
    assert report.passed, report.reason
    assert len(report.hops) == len(records) and report.pseudo_grad.ok
    assert report.worst_rel_err == 0.0


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_honest_miner_with_other_threads_or_bf16_passes(stage):
    for kwargs in ({"threads": 2}, {"miner_dtype": torch.bfloat16}):
        theta, records, pg = simulate(stage, **kwargs)
        report = _audit(stage, theta, records, pg)
        assert report.passed, (kwargs, report.reason)
        if "miner_dtype" in kwargs:  # bf16 differs measurably but stays well inside the tolerances
            worst_hop = max(h.rel_err for h in report.hops)
            # Half the tolerance (it was a quarter under the old resbm/normed default): the honest bf16
            # hop error is heavy-tailed. Over 40 data seeds x 3 inner steps its median is ~0.005 on every
            # stage but single hops reach 0.019 (stage 0; this data seed 3 is that worst case) to 0.035
            # under the postnorm + re-injection default, and 0.041 under the old default (stage 2, seed 5).
            assert 0 < worst_hop < DEFAULT_TOLERANCES.rel_err / 2
            assert 0 < report.pseudo_grad.rel_err < DEFAULT_TOLERANCES.pg_rel_err / 2


def _fabricate(records, fn, kinds=("fwd", "bwd", "fwdbwd")):
    out = []
    for i, r in enumerate(records):
        if r.kind in kinds and r.claimed_output is not None:
            r = replace(r, claimed_output=fn(i, r))
        out.append(r)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_random_outputs_fail(honest, stage):
    theta, records, _ = honest[stage]
    gen = torch.Generator().manual_seed(5)
    fake = _fabricate(records, lambda i, r: torch.randn(r.claimed_output.shape, generator=gen) * r.claimed_output.norm()
                      / math.sqrt(r.claimed_output.numel()))
    report = _audit(stage, theta, fake)
    assert report.failed and report.hops[-1].rel_err > 1.0 and report.hops[-1].index == 0


@pytest.mark.parametrize("stage", [1, 2])
def test_copied_outputs_of_another_sample_fail(honest, stage):
    theta, records, _ = honest[stage]
    kind = "fwd" if stage < S - 1 else "fwdbwd"
    same = [r for r in records if r.kind == kind]
    donor = {same[k].sample_id: same[k - 1].claimed_output for k in range(1, len(same))}
    fake = [replace(r, claimed_output=donor[r.sample_id]) if r.kind == kind and r.sample_id in donor else r
            for r in records]
    report = _audit(stage, theta, fake)
    assert report.failed
    bad = report.hops[-1]
    assert bad.sample_id == same[1].sample_id and bad.rel_err > 0.3


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stale_weights_fail(stage):
    theta, records, pg = simulate(stage, skip_step=0)
    report = _audit(stage, theta, records, pg)
    assert report.failed
    if stage != 1:  # outer stages: the first hops after the skipped step already give it away
        assert report.hops[-1].inner_step == 1 and report.hops[-1].rel_err > 2 * DEFAULT_TOLERANCES.rel_err
    # the middle stage's hops drift less; the pseudo-gradient catches a skipped step on every stage
    loose_hops = replace(DEFAULT_TOLERANCES, rel_err=1.0, min_cosine=0.0, norm_ratio=1.0)
    report = _audit(stage, theta, records, pg, tol=loose_hops)
    assert report.failed and report.pseudo_grad.rel_err > 2 * DEFAULT_TOLERANCES.pg_rel_err


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_lazy_zero_or_scaled_gradients_fail(honest, stage, factor):
    theta, records, _ = honest[stage]
    fake = _fabricate(records, lambda i, r: r.claimed_output * factor, kinds=("bwd", "fwdbwd"))
    report = _audit(stage, theta, fake)
    assert report.failed
    assert report.hops[-1].kind in ("bwd", "fwdbwd")
    assert report.hops[-1].rel_err == pytest.approx(1.0 - factor, abs=1e-6)


def test_wrong_loss_fails_and_pseudo_grad_is_checked(honest):
    theta, records, pg = honest[S - 1]
    fake = [replace(r, claimed_loss=r.claimed_loss * 0.9) for r in records]
    report = _audit(S - 1, theta, fake)
    assert report.failed and "loss" in report.reason
    half = {n: t * 0.5 for n, t in pg.items()}
    report = _audit(S - 1, theta, records, half)
    assert report.failed and report.pseudo_grad.rel_err == pytest.approx(0.5)  # ||pg/2 - pg|| / ||pg||


def _perturb_one(records, index, fn):
    out = list(records)
    out[index] = replace(out[index], claimed_output=fn(out[index].claimed_output))
    return out


def _orthogonal(x, seed=0):
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).double()
    xd = x.double()
    noise -= (noise.flatten() @ xd.flatten()) / (xd.flatten() @ xd.flatten()) * xd
    return noise / noise.norm()


def test_rel_err_tolerance_both_sides(honest):
    theta, records, _ = honest[1]
    tol = replace(DEFAULT_TOLERANCES, min_cosine=0.0, norm_ratio=10.0)
    for eps, ok in ((0.045, True), (0.055, False)):
        fake = _perturb_one(records, 2, lambda c: (c.double() + eps * c.norm() * _orthogonal(c)).float())
        report = _audit(1, theta, fake, tol=tol)
        assert report.passed is ok, (eps, report.reason)
        assert report.hops[2].rel_err == pytest.approx(eps, rel=1e-3)


def test_cosine_tolerance_both_sides(honest):
    theta, records, _ = honest[1]
    tol = replace(DEFAULT_TOLERANCES, rel_err=10.0, norm_ratio=10.0)
    for cos, ok in ((0.9985, True), (0.9975, False)):
        def rotate(c):
            sin = math.sqrt(1 - cos * cos)
            return (c.double() * cos + sin * c.double().norm() * _orthogonal(c)).float()
        report = _audit(1, theta, _perturb_one(records, 1, rotate), tol=tol)
        assert report.passed is ok, (cos, report.reason)
        assert report.hops[1].cosine == pytest.approx(cos, abs=1e-5)


def test_norm_ratio_tolerance_both_sides(honest):
    theta, records, _ = honest[2]
    tol = replace(DEFAULT_TOLERANCES, rel_err=10.0, min_cosine=0.0)
    for scale, ok in ((1.045, True), (0.955, True), (1.055, False), (0.945, False)):
        report = _audit(2, theta, _perturb_one(records, 0, lambda c: c * scale), tol=tol)
        assert report.passed is ok, (scale, report.reason)


def test_loss_tolerance_both_sides(honest):
    theta, records, _ = honest[2]
    loss = records[0].claimed_loss
    bound = DEFAULT_TOLERANCES.loss_abs + DEFAULT_TOLERANCES.loss_rel * abs(loss)
    for delta, ok in ((0.9 * bound, True), (1.1 * bound, False)):
        fake = [replace(records[0], claimed_loss=loss + delta)] + records[1:]
        assert _audit(2, theta, fake).passed is ok


def test_pseudo_grad_tolerance_both_sides(honest):
    theta, records, pg = honest[0]
    flat = torch.cat([pg[n].reshape(-1) for n in sorted(pg)])
    direction = _orthogonal(flat, seed=3)
    for eps, ok in ((0.22, True), (0.28, False)):
        noisy, offset = {}, 0
        for n in sorted(pg):
            k = pg[n].numel()
            noisy[n] = (pg[n].double() + eps * flat.norm() * direction[offset:offset + k].reshape(pg[n].shape)).float()
            offset += k
        report = _audit(0, theta, records, noisy)
        assert report.passed is ok, (eps, report.reason)


def test_time_limit_gives_incomplete_not_failed(honest):
    theta, records, pg = honest[1]
    report = _audit(1, theta, records, pg, max_seconds=0.0)
    assert report.status == "incomplete" and not report.failed and not report.passed
    assert "time limit" in report.reason


def test_malformed_records_fail_with_reason(honest):
    theta, records, _ = honest[1]
    unordered = list(reversed(records))
    assert "order" in _audit(1, theta, unordered).reason
    no_input = [replace(records[0], inputs=None)] + records[1:]
    report = _audit(1, theta, no_input)
    assert report.failed and "no input" in report.reason
    wrong_shape = _perturb_one(records, 0, lambda c: c[:, :-1])
    report = _audit(1, theta, wrong_shape)
    assert report.failed and "shape" in report.reason


def test_compare_tensors_edge_cases():
    z = torch.zeros(4)
    assert compare_tensors(z, z) == (0.0, 1.0, 1.0)
    rel, cos, ratio = compare_tensors(torch.ones(4), z)
    assert rel == 1.0 and cos == 0.0 and ratio == 0.0
    rel, cos, ratio = compare_tensors(z, torch.ones(4))
    assert rel == math.inf and cos == 0.0 and ratio == math.inf
    rel, cos, ratio = compare_tensors(torch.ones(4), 2 * torch.ones(4))
    assert rel == pytest.approx(1.0) and cos == pytest.approx(1.0) and ratio == pytest.approx(2.0)

"""Honest miners only, on different dtypes, over three rounds: no false positives, and weights in
proportion to compute-weighted verified hops (the last stage's single miner does twice the work of
each of stage 0's two replicas, and gets about twice the weight)."""
from __future__ import annotations

import logging

import pytest
import torch

from neurons.transfer import ObjectTransfer
from neurons.validator_loop import Validator, ValidatorSettings
from tests.harness.validator_subnet import RATE_LIMIT, run_subnet, throughput_by_miner

log = logging.getLogger(__name__)

ROUNDS = 3
# Registration alternates stages (fewest replicas, ties to the lowest index): 0, 1, 0.
MINERS = [
    ("s0-fp32", "honest", torch.float32, 0),
    ("s1-fp32", "honest", torch.float32, 1),
    ("s0-bf16", "honest", torch.bfloat16, 0),
]
BURN = 0.2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """Run the honest subnet, then validate all its rounds in one window."""
    # speed routing off: on a loaded CPU the bf16 replica is the slower one and would be routed
    # around (bridge/speed.py); this test is about audits across dtypes and weight in proportion to work
    with run_subnet(tmp_path_factory.mktemp("honest"), MINERS, bridge_flags=("--slow-factor", "0"),
                    total_rounds=ROUNDS, samples_per_round=8,
                    sync_mode="state",  # the whole-state sync (the sharded one is the default since w22b)
                    incentives={"audit_fraction": 1.0, "burn_share": BURN}) as net:
        chain, client, vkey = net["chain"], net["client"], net["keys"]["validators"][0]
        settings = ValidatorSettings(state_path=str(net["tmp"] / "v.json"))
        v = Validator(client, ObjectTransfer(), chain, vkey, settings)
        chain.advance_blocks(RATE_LIMIT)
        v.tick()
        logs = [client.hoplog(r) for r in range(ROUNDS)]
        yield dict(net, v=v, logs=logs, weights=chain.weights_of(vkey.ss58_address))


def test_honest_miners_on_fp32_and_bf16_pass_every_audit(result):
    v, names = result["v"], result["names"]
    assert v.next_round == ROUNDS and v.weights_set == 1
    audited = sorted((rnd, hk) for rnd, hk, _, _ in v.audits.verdicts)
    worked = sorted({(r, rec.miner_hotkey) for r, lg in enumerate(result["logs"]) for rec in lg.records})
    assert audited == worked, "every miner, every round it worked (audit_fraction 1)"
    assert {hk for _, hk in audited} == set(names.values()), "every dtype was audited"
    failures = [x for x in v.audits.verdicts if not x[2]]
    assert failures == []
    assert v.audits.incomplete == 0
    log.warning("honest audits: %d run, %d false positives, %.3fs replay per audited miner-round",
                v.audits.runs, len(failures), v.audits.seconds / v.audits.runs)


def test_twice_the_verified_hops_gets_about_twice_the_weight(result):
    w, uid, names = result["weights"], result["uid"], result["names"]
    tp: dict[str, float] = {}
    for lg in result["logs"]:
        for hk, t in throughput_by_miner(lg).items():
            tp[hk] = tp.get(hk, 0.0) + t
    total = sum(tp.values())
    mg = result["chain"].metagraph()
    assert w[mg.uid_of(mg.owner_hotkey)] == pytest.approx(BURN, abs=1e-4)
    for n, hk in names.items():
        assert w[uid[n]] == pytest.approx((1 - BURN) * tp[hk] / total, rel=1e-3, abs=2e-4)
    last = w[uid["s1-fp32"]]
    ratios = [last / w[uid[n]] for n in ("s0-fp32", "s0-bf16")]
    log.warning("last-stage / stage-0 weight ratios: %s", [f"{r:.2f}" for r in ratios])
    assert w[uid["s0-fp32"]] + w[uid["s0-bf16"]] == pytest.approx(last, rel=0.05)
    # Routing can split stage 0's samples unevenly between its two replicas (1/3 vs 2/3 seen on a
    # fresh CI machine), so the "twice" claim is per stage: a last-stage miner (fwdbwd = 3 per sample)
    # earns twice the mean stage-0 miner (fwd 1 + bwd 2 per sample, shared by two), and both earn.
    assert all(w[uid[n]] > 0 for n in ("s0-fp32", "s0-bf16")), ratios
    assert last / ((w[uid["s0-fp32"]] + w[uid["s0-bf16"]]) / 2) == pytest.approx(2.0, rel=0.1), ratios


def test_the_whole_state_export_is_the_replicas_model_and_its_loss_the_validators(result, tmp_path):
    """Under the whole-state sync too: resbm-export's model gives the replicas' logits bit for bit,
    and the validator's live held-out loss of the last round is that model's on the run's windows."""
    from resbm import codec, data
    from resbm.evaluate import evaluate_lm, held_out_batches
    from resbm.export import load_export
    from resbm.stages import pipeline_logits
    from scripts.export_model import main as export_main

    assert export_main(["--bridge", result["bridge"].url, "--out", str(tmp_path / "m")]) == 0
    ex = load_export(tmp_path / "m")
    assert ex.info["sync_mode"] == "state" and ex.info["round"] == ROUNDS - 1
    cfg = ex.config
    tokens, _ = data.batch(3, 1, 2, cfg.seq_len)
    with torch.no_grad():
        want = ex.model(tokens)
    miners = result["miners"]
    stage0 = [m.worker.module for m in miners.values() if m.worker.stage_index == 0]
    (stage1,) = [m.worker.module for m in miners.values() if m.worker.stage_index == 1]
    assert len(stage0) == 2
    for first in stage0:  # the bf16 replica's weights are fp32 too: the merged state is the same bytes
        got = pipeline_logits([first, stage1], tokens, lambda z: codec.decode(
            codec.encode(z, cfg.wire_codec), z.shape, cfg.wire_codec, 1 << 30))
        assert torch.equal(got, want)
    live = result["v"].live
    assert sorted(live.reported) == list(range(ROUNDS))
    batches = held_out_batches(data.load(), live.tokens, cfg.seq_len)
    assert live.reported[ROUNDS - 1] == pytest.approx(evaluate_lm(lambda t: ex.model(t), batches).loss, rel=1e-6)
    assert ex.info["validation"]["loss"] == live.reported[ROUNDS - 1]

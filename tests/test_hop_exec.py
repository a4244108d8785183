"""The miner's compute and the validator's replay are one function: both paths call
`neurons.hop_exec.run_hop` for every hop kind and get bit-identical outputs on CPU."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from neurons import hop_exec
from neurons.audit import HopRecord, ReplaySettings, replay_round
from neurons.miner_loop import Miner
from neurons.objects import HopInputs, encode_output
from neurons.stage_worker import StageWorker, WorkerError
from resbm import codec, data
from resbm.config import ModelConfig
from resbm.optim import OptimConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S, B, SEED, ROUND, STEPS = 3, 2, 5, 2, 2
CFG = ModelConfig(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=3, n_heads=2, seq_len=16, n_stages=S,
                  bottleneck_dim=4, bottleneck_ratio=None, wire_codec="fp32")  # lossless: claims equal outputs
OCFG = OptimConfig(warmup_steps=0, total_steps=10)
RUN = NS(data_seed=SEED, batch_size=B, dataset=None)
SETTINGS = ReplaySettings(round_index=ROUND, inner_steps_per_round=STEPS, data_seed=SEED, batch_size=B,
                          wire_codec=CFG.wire_codec)


def _worker(stage: int) -> StageWorker:
    return StageWorker(CFG, stage, S, OCFG, init_seed=4)


def _theta_start(stage: int) -> dict[str, torch.Tensor]:
    """Round-start weights with nonzero re-injection tables, so a stage's tokens change its outputs."""
    theta = _worker(stage).theta()
    gen = torch.Generator().manual_seed(stage)
    for name in theta:
        if name.endswith("decoder.embed.weight"):
            theta[name] = torch.randn(theta[name].shape, generator=gen)
    return theta


def _wire(t: torch.Tensor | None) -> torch.Tensor | None:
    """What the next stage (and the validator) decodes from a miner's upload."""
    if t is None:
        return None
    blob = encode_output(t, CFG.wire_codec)[0]
    return codec.decode(blob, tuple(t.shape), CFG.wire_codec, max_bytes=len(blob))


def _miners() -> list[Miner]:
    miners = []
    for s in range(S):
        m = Miner.__new__(Miner)  # the compute path needs no bridge
        m.worker, m.run, m.cfg = _worker(s), RUN, CFG
        m.worker.load_theta(_theta_start(s))
        miners.append(m)
    return miners


def _mine(miners: list[Miner]) -> list[list[HopRecord]]:
    """Three miners run every hop kind through `Miner._compute`: plain fwd/bwd, a flagged recompute
    (the graph is dropped and rebuilt), and a stage-0 bwd with no graph (rebuilt from public tokens)."""
    records: list[list[HopRecord]] = [[] for _ in range(S)]

    def hop(s, kind, sid, step, act=None, grad=None, recompute=False):
        out, loss = miners[s]._compute(NS(kind=kind, sample_id=sid, recompute=recompute, stage=s),
                                       HopInputs(act=act, grad=grad))
        claimed = _wire(out)
        records[s].append(HopRecord(sid, kind, step, recompute=recompute, inputs=act, grad=grad,
                                    claimed_output=claimed, claimed_loss=loss))
        return claimed

    for step in range(STEPS):
        for sid in (10 * step, 10 * step + 1):
            a1 = hop(0, "fwd", sid, step)
            a2 = hop(1, "fwd", sid, step, act=a1)
            g2 = hop(2, "fwdbwd", sid, step, act=a2)
            g1 = hop(1, "bwd", sid, step, grad=g2, recompute=sid % 2 == 1, act=a1 if sid % 2 else None)
            if sid % 2:
                miners[0].worker.release(sid)  # stage 0 lost the graph: it recomputes from the tokens
            assert hop(0, "bwd", sid, step, grad=g1) is None
        for m in miners:
            m._apply_step(ROUND * STEPS + step)
    return records


def test_miner_and_replay_run_the_same_function_with_bit_identical_outputs(monkeypatch):
    calls: list[tuple[str, int, str, int, torch.Tensor | None, float | None]] = []
    real = hop_exec.run_hop
    miners = _miners()
    mine_workers = {id(m.worker) for m in miners}

    def spy(worker, kind, sample_id, *args):
        res = real(worker, kind, sample_id, *args)
        side = "miner" if id(worker) in mine_workers else "replay"
        out = None if res.out is None else res.out.clone()
        calls.append((side, worker.stage_index, kind, sample_id, out, res.loss))
        return res

    monkeypatch.setattr(hop_exec, "run_hop", spy)
    records = _mine(miners)
    mined = sorted(calls, key=lambda c: c[1])  # stable: each stage's hops in the miner's order
    assert {c[0] for c in mined} == {"miner"} and len(mined) == sum(map(len, records))
    assert {c[2] for c in mined} == set(hop_exec.HOP_KINDS)
    calls.clear()
    for s in range(S):
        pg = miners[s].worker.pseudo_gradient(_theta_start(s))
        report = replay_round(lambda s=s: _worker(s), _theta_start(s), records[s], SETTINGS,
                              claimed_pseudo_grad=pg)
        assert report.passed and report.worst_rel_err == 0.0, (s, report.reason)
        assert report.pseudo_grad.rel_err == 0.0
    assert [c[0] for c in calls] == ["replay"] * len(mined)
    for mine, replay in zip(mined, calls):
        assert mine[1:4] == replay[1:4]
        assert (mine[4] is None) == (replay[4] is None), mine[1:4]
        assert mine[4] is None or torch.equal(mine[4], replay[4]), mine[1:4]
        assert mine[5] == replay[5]


def test_a_middle_stage_bwd_without_a_graph_or_an_input_is_refused_on_both_sides():
    w = _worker(1)
    g = torch.zeros(CFG.code_shape(B))
    with pytest.raises(WorkerError, match="no open forward graph and no input code"):
        hop_exec.run_hop(w, "bwd", 3, False, None, g, hop_exec.PublicData(SEED, B))
    with pytest.raises(WorkerError, match="unknown hop kind"):
        hop_exec.run_hop(w, "sideways", 3, False, None, g, hop_exec.PublicData(SEED, B))


def test_a_reissued_forward_replaces_the_open_graph_and_its_backward_matches_a_fresh_one():
    """The bridge re-issues a forward (a retry, a rewind, the miner's re-registration) to a replica that
    still holds the sample's graph: the stale graph is replaced, not refused five times until the sample
    is abandoned, and the backward is the one a replica with no stale graph computes."""
    public = hop_exec.PublicData(SEED, B)
    stale, fresh = _worker(0), _worker(0)
    theta = _theta_start(0)
    stale.load_theta(theta)
    fresh.load_theta(theta)
    hop_exec.run_hop(stale, "fwd", 7, False, None, None, public)
    again = hop_exec.run_hop(stale, "fwd", 7, False, None, None, public)
    first = hop_exec.run_hop(fresh, "fwd", 7, False, None, None, public)
    assert torch.equal(again.out, first.out) and stale.open_graphs == [7]
    g = torch.randn(CFG.code_shape(B), generator=torch.Generator().manual_seed(1))
    a = hop_exec.run_hop(stale, "bwd", 7, False, None, g, public)
    b = hop_exec.run_hop(fresh, "bwd", 7, False, None, g, public)
    assert stale.open_graphs == [] and stale._samples == fresh._samples == 1
    assert a.out is None and b.out is None  # stage 0 sends no gradient back
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(stale.module.parameters(), fresh.module.parameters()))

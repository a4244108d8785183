"""Token re-injection: the exact math, zero init that leaves every other weight alone, AdamW with
decay for its tables, clear errors for missing or bad tokens, and the tokens really being used."""
from __future__ import annotations

import pytest
import torch

from neurons.audit import HopRecord, ReplaySettings, replay_round
from neurons.stage_worker import StageWorker, WorkerError
from resbm import ModelConfig, build_model, build_stages, codec, data
from resbm.boundary_kinds import build_boundary
from resbm.model import lm_loss
from resbm.optim import OptimConfig, build_optimizer, split_params

torch.set_num_threads(1)

B = 2


def _cfg(**kw) -> ModelConfig:
    fields = dict(vocab_size=97, d_model=64, n_layers=3, n_heads=4, seq_len=16, n_stages=3,
                  bottleneck_ratio=16, wire_codec="fp32")
    fields.update(kw)
    return ModelConfig(**fields)


def _tokens(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=torch.Generator().manual_seed(seed))


def _nonzero_tables(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("decoder.embed.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", ["none", "resbm"])
def test_monolithic_forward_is_the_benchmarks_formula(kind):
    """h' = decoder_without_reinjection(z) + E_tok_b[tokens], after postnorm (scripts/bench_compression.py)."""
    on = build_model(_cfg(boundary=kind), seed=2)
    _nonzero_tables(on)
    off = build_model(_cfg(boundary=kind, token_reinject=False), seed=2)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if ".decoder.embed." not in k})
    tokens = _tokens(on.cfg)
    x = off.embed(tokens)
    for i, block in enumerate(off.blocks):
        x = block(x, off.rope_cos, off.rope_sin)
        if i in off._boundary_after:
            b = off._boundary_after[i]
            x = off.boundaries[b](x) + on.boundaries[b].decoder.embed(tokens)
    want = off.head(off.norm(x))
    assert torch.equal(on(tokens), want)
    assert not torch.equal(off(tokens), want)
    assert torch.equal(on(tokens, tokens), lm_loss(want, tokens))


def test_flag_on_and_off_share_every_other_initial_weight_and_rng_state():
    torch.manual_seed(0)
    on = build_model(_cfg(), seed=7).state_dict()
    rng_on = torch.get_rng_state()
    torch.manual_seed(0)
    off = build_model(_cfg(token_reinject=False), seed=7).state_dict()
    rng_off = torch.get_rng_state()
    extra = sorted(set(on) - set(off))
    assert extra == ["boundaries.0.decoder.embed.weight", "boundaries.1.decoder.embed.weight"]
    assert set(off) < set(on)
    for name in off:
        assert torch.equal(on[name], off[name]), name
    assert all(not on[n].any() for n in extra)  # zero init: re-injection starts as a no-op
    assert torch.equal(rng_on, rng_off)  # building the tables draws nothing from the global RNG
    tokens = _tokens(_cfg())
    m_on, m_off = build_model(_cfg(), seed=7), build_model(_cfg(token_reinject=False), seed=7)
    assert torch.equal(m_on(tokens), m_off(tokens))


def test_reinjection_tables_train_under_adamw_with_weight_decay():
    model = build_model(_cfg())
    muon, adamw = split_params(model)
    tables = ["boundaries.0.decoder.embed.weight", "boundaries.1.decoder.embed.weight"]
    assert all(n in adamw and n not in muon for n in tables)
    assert "boundaries.0.decoder.proj.weight" in muon
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    params = dict(model.named_parameters())
    decayed = [g for g in opt.optimizers["adamw"].param_groups if g["weight_decay"] == 0.1]
    assert len(decayed) == 1
    assert all(any(params[n] is p for p in decayed[0]["params"]) for n in tables)


def test_missing_or_bad_tokens_raise_clear_errors():
    cfg = _cfg()
    stage1 = build_stages(cfg, stages=[1])[0]
    code = torch.zeros(cfg.code_shape(B))
    good = _tokens(cfg)
    with pytest.raises(ValueError, match="decoder needs the sample's input tokens"):
        stage1(code)
    with pytest.raises(ValueError, match=r"tokens shape \(2, 15\) must be \(B, T\) = \(2, 16\)"):
        stage1(code, tokens=good[:, 1:])
    with pytest.raises(ValueError, match="int64"):
        stage1(code, tokens=good.float())
    with pytest.raises(ValueError, match=r"in \[0, 97\), got min 0 max 97"):
        stage1(code, tokens=good.clamp(max=0) + torch.tensor([[0] * 15 + [97]] * B))
    with pytest.raises(ValueError, match=r"got min -\d+ max -1"):
        stage1(code, tokens=good - good.max() - 1)
    decoder = build_boundary(cfg, encoder=False).decoder
    with pytest.raises(ValueError, match="needs the sample's input tokens"):
        decoder(code)
    stage1(code, tokens=good)  # fine
    off = build_stages(_cfg(token_reinject=False), stages=[1])[0]
    assert not off.needs_tokens and stage1.needs_tokens
    assert torch.equal(off(code), off(code, tokens=good))  # ignored when not re-injecting


def test_stage_output_depends_on_the_tokens_once_the_table_is_nonzero():
    cfg = _cfg()
    s1, s2 = build_stages(cfg, seed=3, stages=[1, 2])
    code = torch.randn(cfg.code_shape(B), generator=torch.Generator().manual_seed(5))
    a, b = _tokens(cfg, 0), _tokens(cfg, 1)
    assert torch.equal(s1(code, tokens=a), s1(code, tokens=b))  # zero tables at init
    for stage in (s1, s2):
        _nonzero_tables(stage)
    assert not torch.equal(s1(code, tokens=a), s1(code, tokens=b))
    assert s2(code, a, tokens=a) != s2(code, a, tokens=b)


def test_stage_worker_needs_tokens_for_forward_recompute_and_fwdbwd():
    cfg = _cfg()
    ocfg = OptimConfig(warmup_steps=0, total_steps=10)
    w0, w1, w2 = (StageWorker(cfg, s, 3, ocfg, init_seed=1) for s in range(3))
    assert (w0.needs_tokens, w1.needs_tokens, w2.needs_tokens) == (False, True, True)
    tokens = _tokens(cfg)
    code = w0.forward(0, tokens)
    with pytest.raises(WorkerError, match="needs the sample's token ids"):
        w1.forward(0, code)
    with pytest.raises(WorkerError, match="needs the sample's token ids"):
        w1.backward(0, torch.ones(cfg.code_shape(B)), recompute_input=code)
    with pytest.raises(WorkerError, match="needs the sample's token ids"):
        w2.forward_backward(0, code, tokens)
    out = w1.forward(0, code, tokens)
    loss, grad = w2.forward_backward(0, out, tokens, tokens)
    assert grad is not None and loss > 0
    assert w1.backward(0, grad) is not None  # the open graph holds the tokens: none needed again


DATA_CFG = _cfg(vocab_size=data.VOCAB_SIZE, d_model=32, n_heads=2, bottleneck_dim=4, bottleneck_ratio=None,
               wire_codec="bf16")


def _middle_worker() -> StageWorker:
    """Stage 1 of 3 with a nonzero re-injection table, so the tokens change its outputs."""
    w = StageWorker(DATA_CFG, 1, 3, OptimConfig(warmup_steps=0, total_steps=10), init_seed=1)
    theta = w.theta()
    shape = theta["boundaries.0.decoder.embed.weight"].shape
    theta["boundaries.0.decoder.embed.weight"] = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    w.load_theta(theta)
    return w


def _code_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x, g = (codec.roundtrip(torch.randn(DATA_CFG.code_shape(B), generator=gen), "bf16") for _ in range(2))
    return x, g


def test_miner_derives_the_tokens_for_middle_stage_forward_and_recompute():
    from types import SimpleNamespace as NS

    from neurons.miner_loop import Miner
    miner = Miner.__new__(Miner)  # _compute needs no network
    miner.worker, miner.cfg = _middle_worker(), DATA_CFG
    miner.run = NS(data_seed=3, batch_size=B, dataset=None)
    ref = _middle_worker()
    x, g = _code_and_grad()
    tok = {sid: data.batch(3, sid, B, DATA_CFG.seq_len)[0] for sid in (7, 8)}
    out, _ = miner._compute(NS(kind="fwd", sample_id=7, recompute=False, stage=1), NS(act=x, grad=None))
    assert torch.equal(out, ref.forward(7, x, tok[7]))
    gi, _ = miner._compute(NS(kind="bwd", sample_id=7, recompute=False, stage=1), NS(act=None, grad=g))
    assert torch.equal(gi, ref.backward(7, g))
    gr, _ = miner._compute(NS(kind="bwd", sample_id=8, recompute=True, stage=1), NS(act=x, grad=g))
    assert torch.equal(gr, ref.backward(8, g, recompute_input=x, tokens=tok[8]))
    assert not torch.equal(gr, ref.backward(8, g, recompute_input=x, tokens=tok[7]))


def test_validator_replays_stage_one_with_the_samples_own_tokens_including_recompute():
    settings = ReplaySettings(round_index=0, inner_steps_per_round=1, data_seed=3, batch_size=B, wire_codec="bf16")
    make = lambda: StageWorker(DATA_CFG, 1, 3, OptimConfig(warmup_steps=0, total_steps=10), init_seed=1)  # noqa: E731
    theta = _middle_worker().theta()
    x, g = _code_and_grad()

    def miner_records(token_sample: int) -> list[HopRecord]:
        w = _middle_worker()
        tokens = data.batch(3, token_sample, B, DATA_CFG.seq_len)[0]
        out = w.forward(7, x, tokens)
        w.release(7)  # the backward lands on a replica without the graph: it recomputes
        gi = codec.roundtrip(w.backward(7, g, recompute_input=x, tokens=tokens), "bf16")
        return [HopRecord(7, "fwd", 0, inputs=x, claimed_output=out),
                HopRecord(7, "bwd", 0, recompute=True, inputs=x, grad=g, claimed_output=gi)]

    honest = replay_round(make, theta, miner_records(7), settings)
    assert honest.passed and honest.worst_rel_err == 0.0, honest.reason
    wrong = replay_round(make, theta, miner_records(8), settings)  # another sample's tokens
    assert wrong.failed and wrong.hops[0].rel_err > 0.1

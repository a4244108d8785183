"""StageWorker: staged hops equal the reference pipeline, mean-gradient inner steps, recompute,
graph bookkeeping, theta load/reset and input checks."""
import pytest
import torch

from neurons.stage_worker import StageWorker, WorkerError, global_inner_step
from resbm import codec, data
from resbm.config import ModelConfig
from resbm.model import build_model
from resbm.optim import OptimConfig, build_optimizer
from resbm.stages import build_stages, run_pipeline

S = 3
B = 2
CFG = ModelConfig(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=3, n_heads=2, seq_len=16,
                  n_stages=S, bottleneck_dim=4, wire_codec="fp32")
OCFG = OptimConfig(warmup_steps=0, total_steps=50)
SEED = 5



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def _workers(dtype=torch.float32):
    return [StageWorker(CFG, s, S, OCFG, dtype=dtype, init_seed=SEED) for s in range(S)]


def _pipeline(workers, sid, data_seed=1):
    """Run one sample through the workers as the network would; returns (loss, codes, grads)."""
    tokens, targets = data.batch(data_seed, sid, B, CFG.seq_len)
    codes, x = [], tokens
    for w in workers[:-1]:
        x = w.forward(sid, x, tokens)  # stage 0 reads x; later stages re-inject the tokens
        codes.append(x)
    loss, g = workers[-1].forward_backward(sid, x, targets, tokens)
    grads = [g]
    for w in reversed(workers[:-1]):
        g = w.backward(sid, g)
        grads.append(g)
    return loss, codes, grads


def test_round_zero_theta_is_the_models_init():
    model_state = build_model(CFG, seed=SEED).state_dict()
    for s, w in enumerate(_workers()):
        theta = w.theta()
        assert theta and all(torch.equal(theta[n], model_state[n]) for n in theta)
        assert list(theta) == sorted(theta)
    again = StageWorker(CFG, 1, S, OCFG, init_seed=SEED).theta()
    other = StageWorker(CFG, 1, S, OCFG, init_seed=SEED + 1).theta()
    first = _workers()[1].theta()
    assert all(torch.equal(again[n], first[n]) for n in first)
    assert any(not torch.equal(other[n], first[n]) for n in first)


def test_hops_equal_the_reference_pipeline():
    workers = _workers()
    loss, codes, grads = _pipeline(workers, sid=4)
    ref = build_stages(CFG, seed=SEED)
    tokens, targets = data.batch(1, 4, B, CFG.seq_len)
    r = run_pipeline(ref, tokens, targets)
    assert loss == r.loss
    assert all(torch.equal(a, b) for a, b in zip(codes, r.codes))
    assert torch.equal(grads[0], r.code_grads[1]) and torch.equal(grads[1], r.code_grads[0])
    assert grads[2] is None  # stage 0 sends nothing back
    assert all(w.open_graphs == [] and w.samples_since_step == 1 for w in workers)
    for w, rs in zip(workers, ref):
        for (n, p), (_, q) in zip(w.module.named_parameters(), rs.named_parameters()):
            assert torch.equal(p.grad, q.grad), n


def test_inner_step_uses_the_mean_gradient_and_global_step():
    workers = _workers()
    for sid in (0, 1):
        _pipeline(workers, sid)
    stepped = [w.inner_step(7) for w in workers]
    assert stepped == [2, 2, 2] and all(w.samples_since_step == 0 for w in workers)
    # reference: same stages, summed losses / 2, one optimizer step at global step 7
    ref = build_stages(CFG, seed=SEED)
    opts = [build_optimizer(m, OCFG) for m in ref]
    for sid in (0, 1):
        tokens, targets = data.batch(1, sid, B, CFG.seq_len)
        run_pipeline(ref, tokens, targets)
    for m, o in zip(ref, opts):
        for p in m.parameters():
            p.grad /= 2
        o.step(7)
    for w, m in zip(workers, ref):
        theta = w.theta()
        for n, t in m.state_dict().items():
            torch.testing.assert_close(theta[n], t, rtol=0, atol=1e-6)
        assert all(p.grad is None for p in w.module.parameters())
    start = StageWorker(CFG, 1, S, OCFG, init_seed=SEED).theta()
    pg = workers[1].pseudo_gradient(start)
    assert sum(float(t.abs().sum()) for t in pg.values()) > 0


def test_inner_step_refuses_open_graphs_and_empty_accumulation():
    w0 = _workers()[0]
    with pytest.raises(WorkerError, match="no sample"):
        w0.inner_step(0)
    tokens, _ = data.batch(1, 0, B, CFG.seq_len)
    w0.forward(0, tokens)
    w0.forward(1, tokens)
    assert w0.open_graphs == [0, 1]
    with pytest.raises(WorkerError, match="open forward graphs"):
        w0.inner_step(0)
    with pytest.raises(WorkerError, match="already open"):
        w0.forward(0, tokens)
    assert w0.release(1) and not w0.release(1)
    w0.backward(0, torch.ones(CFG.code_shape(B)))
    assert w0.open_graphs == [] and w0.inner_step(0) == 1


def test_closing_an_inner_step_drops_abandoned_graphs_and_steps_only_on_gradients():
    w0 = _workers()[0]
    tokens, _ = data.batch(1, 0, B, CFG.seq_len)
    w0.forward(0, tokens)
    w0.forward(1, tokens)
    w0.backward(0, torch.ones(CFG.code_shape(B)))
    before = {n: p.detach().clone() for n, p in w0.module.named_parameters()}
    steps: list[int] = []
    assert w0.close_inner_step(global_inner_step(2, 5, 3), lambda g: steps.append(g) or w0.inner_step(g)) == [1]
    assert steps == [13] and w0.open_graphs == [] and w0.samples_since_step == 0
    assert any(not torch.equal(before[n], p) for n, p in w0.module.named_parameters())  # it stepped
    w0.forward(2, tokens)  # a forward whose backward went elsewhere, and no gradient: no step
    assert w0.close_inner_step(14, steps.append) == [2] and steps == [13] and w0.open_graphs == []


def test_recompute_backward_equals_backward_of_the_original_forward():
    a, b = _workers()[1], _workers()[1]
    code = torch.randn(CFG.code_shape(B), generator=torch.Generator().manual_seed(0))
    grad_out = torch.randn(CFG.code_shape(B), generator=torch.Generator().manual_seed(1))
    tokens = data.batch(1, 9, B, CFG.seq_len)[0]
    a.forward(9, code, tokens)
    ga = a.backward(9, grad_out)
    with pytest.raises(WorkerError, match="no open forward graph"):
        b.backward(9, grad_out)
    gb = b.backward(9, grad_out, recompute_input=code, tokens=tokens)
    assert torch.equal(ga, gb) and b.open_graphs == [] and b.samples_since_step == 1
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_load_theta_checks_and_resets_optimizer():
    workers = _workers()
    _pipeline(workers, 0)
    w = workers[1]
    w.inner_step(0)
    assert len(w.optimizer.optimizers["muon"].state) > 0
    theta = {n: t + 1.0 for n, t in w.theta().items()}
    tokens, _ = data.batch(1, 0, B, CFG.seq_len)
    workers[0].forward(3, tokens)
    w.forward(3, workers[0].forward(4, tokens), tokens)
    w.load_theta(theta)
    assert w.open_graphs == [] and w.samples_since_step == 0
    assert len(w.optimizer.optimizers["muon"].state) == 0
    assert all(torch.equal(w.theta()[n], theta[n]) for n in theta)
    bad = dict(theta)
    bad.pop(next(iter(bad)))
    with pytest.raises(WorkerError, match="missing"):
        w.load_theta(bad)
    name = next(iter(theta))
    with pytest.raises(WorkerError, match="shape"):
        w.load_theta(dict(theta, **{name: torch.zeros(3)}))
    nan = dict(theta, **{name: theta[name].clone().fill_(float("nan"))})
    with pytest.raises(WorkerError, match="NaN"):
        w.load_theta(nan)


def test_bad_inputs_are_refused_by_name():
    w0, w1, w2 = _workers()
    with pytest.raises(WorkerError, match="int64 token ids"):
        w0.forward(0, torch.zeros(B, CFG.seq_len))
    with pytest.raises(WorkerError, match="float code"):
        w1.forward(0, torch.zeros(B, CFG.seq_len, CFG.code_dim + 1))
    with pytest.raises(WorkerError, match="NaN"):
        w1.forward(0, torch.full(CFG.code_shape(B), float("nan")))
    with pytest.raises(WorkerError, match="token ids"):
        w1.forward(0, torch.zeros(CFG.code_shape(B)))
    w1.forward(0, torch.zeros(CFG.code_shape(B)), data.batch(1, 0, B, CFG.seq_len)[0])
    with pytest.raises(WorkerError, match="grad_output shape"):
        w1.backward(0, torch.zeros(B, CFG.seq_len, 1))
    with pytest.raises(WorkerError, match="last stage"):
        w2.forward(0, torch.zeros(CFG.code_shape(B)))
    with pytest.raises(WorkerError, match="last stage only"):
        w1.forward_backward(0, torch.zeros(CFG.code_shape(B)), torch.zeros(B, CFG.seq_len, dtype=torch.int64))
    with pytest.raises(WorkerError, match="n_stages"):
        StageWorker(CFG, 0, S + 1, OCFG)
    with pytest.raises(WorkerError, match="dtype"):
        StageWorker(CFG, 0, S, OCFG, dtype=torch.float64)


def test_bf16_autocast_is_close_to_fp32_and_keeps_fp32_params():
    loss32, codes32, grads32 = _pipeline(_workers(), 2)
    w16 = _workers(torch.bfloat16)
    loss16, codes16, grads16 = _pipeline(w16, 2)
    assert abs(loss16 - loss32) < 0.05 and loss16 != loss32
    for a, b in zip(codes16 + grads16[:2], codes32 + grads32[:2]):
        assert a.dtype == torch.float32
        assert float((a - b).norm() / b.norm()) < 0.05
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in w16[1].module.parameters())


def test_outputs_survive_the_wire_codec_exactly():
    cfg = ModelConfig(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=2, n_heads=2, seq_len=16,
                      n_stages=2, bottleneck_dim=4, wire_codec="int8")
    w = StageWorker(cfg, 0, 2, OCFG)
    code = w.forward(0, data.batch(1, 0, B, cfg.seq_len)[0])
    decoded = codec.decode(codec.encode(code, "int8"), cfg.code_shape(B), "int8", 1 << 20)
    assert torch.equal(decoded, code)


def test_a_gradient_that_overflows_fp32_skips_the_step_and_leaves_the_weights_finite():
    """A finite but absurd input gradient (a lying downstream stage, or one too large for fp32)
    makes the accumulated gradient inf: the replica skips that inner step, says so, and keeps
    finite weights, instead of stepping to NaN and sending a NaN pseudo-gradient at the round end."""
    w0 = _workers()[0]
    before = {n: t.clone() for n, t in w0.theta().items()}
    tokens, _ = data.batch(1, 0, B, CFG.seq_len)
    w0.forward(0, tokens)
    w0.backward(0, torch.full(CFG.code_shape(B), 3e38))
    assert w0.inner_step(0) == 0 and w0.memory_stats["skipped_steps"] == 1
    assert all(torch.equal(before[n], t) for n, t in w0.theta().items()), "the weights moved"
    w0.forward(1, tokens)  # the next inner step trains as usual
    w0.backward(1, torch.ones(CFG.code_shape(B)))
    assert w0.inner_step(1) == 1
    assert all(torch.isfinite(t).all() for t in w0.theta().values())
    assert any(not torch.equal(before[n], t) for n, t in w0.theta().items())

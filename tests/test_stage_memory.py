"""Memory is bounded and out-of-memory is not failure, in the stage compute: over a memory budget a
forward keeps only its input and its backward recomputes (same results), and an out-of-memory
error (injected by a fault fixture: a forward pre-hook that raises torch.OutOfMemoryError, as the
CUDA allocator does) frees the kept graphs and retries, whole or in smaller pieces of the batch."""
from __future__ import annotations

import pytest
import torch

from neurons.stage_memory import parse_memory
from neurons.stage_worker import StageWorker, WorkerError
from resbm import data
from resbm.config import ModelConfig
from resbm.optim import OptimConfig

CFG = ModelConfig(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=3, n_heads=2, seq_len=16, n_stages=3,
                  bottleneck_dim=4, wire_codec="bf16")
BATCH = 4


class OutOfMemoryAbove(StageWorker):
    """A stage on a device too small for batches over `max_batch` sequences, and (`first_failures`)
    one whose first forwards fail while another process holds the memory."""

    def __init__(self, stage: int, max_batch: int = BATCH, first_failures: int = 0, **kw):
        super().__init__(CFG, stage, CFG.n_stages, OptimConfig(warmup_steps=0, total_steps=10), init_seed=3, **kw)
        self.max_batch, self.failures_left, self.raised = max_batch, first_failures, 0
        self.module.register_forward_pre_hook(self._allocate)

    def _allocate(self, module, args):
        if self.failures_left > 0 or args[0].shape[0] > self.max_batch:
            self.failures_left -= 1
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def _plain(stage: int, **kw) -> StageWorker:
    return StageWorker(CFG, stage, CFG.n_stages, OptimConfig(warmup_steps=0, total_steps=10), init_seed=3, **kw)


def _inputs(stage: int, sid: int):
    tokens, targets = data.batch(7, sid, BATCH, CFG.seq_len)
    code = torch.randn((BATCH, CFG.seq_len, CFG.code_dim), generator=torch.Generator().manual_seed(sid))
    grad = torch.randn((BATCH, CFG.seq_len, CFG.code_dim), generator=torch.Generator().manual_seed(100 + sid))
    return (tokens if stage == 0 else code), tokens, targets, grad


def _round(w: StageWorker, sids=(1, 2, 3)) -> dict:
    """Forwards of every sample (graphs held), then their backwards, then a step: what a miner does."""
    s, out = w.stage_index, {}
    side = lambda t: t if w.needs_tokens else None  # noqa: E731
    if w.is_last:
        for sid in sids:
            x, tokens, targets, _ = _inputs(s, sid)
            out[sid] = w.forward_backward(sid, x, targets, side(tokens))
    else:
        for sid in sids:
            x, tokens, _, _ = _inputs(s, sid)
            out[("fwd", sid)] = w.forward(sid, x, side(tokens))
        for sid in sids:
            out[("bwd", sid)] = w.backward(sid, _inputs(s, sid)[3])
    w.inner_step(0)
    out["theta"] = w.theta()
    return out


def _same(a: dict, b: dict, exact: bool) -> None:
    for k in a:
        va, vb = (a[k], b[k]) if k != "theta" else (list(a[k].values()), list(b[k].values()))
        for x, y in zip(va if isinstance(va, (list, tuple)) else [va], vb if isinstance(vb, (list, tuple)) else [vb]):
            if x is None:
                assert y is None, k
            elif isinstance(x, float):
                assert x == y if exact else x == pytest.approx(y, rel=1e-5), k
            elif exact:
                assert torch.equal(x, y), k
            elif k == "theta":  # Muon's Newton-Schulz (bf16) turns the gradients' rounding into ~1e-3
                assert (x - y).norm() <= 1e-2 * x.norm(), k
            else:
                assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), k


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("stage", [0, 1])
def test_over_the_budget_a_forward_keeps_its_input_and_the_backward_recomputes_identically(stage):
    free = _plain(stage)
    ref = _round(free)
    budgeted = _plain(stage, max_memory=1)  # not even one graph fits: every backward recomputes
    got = _round(budgeted)
    _same(ref, got, exact=True)  # the same outputs, input gradients and weights, bit for bit on a CPU
    # the first graph is measured, found over the budget and dropped; the next two are never kept
    assert budgeted.memory_stats["dropped_graphs"] == 1 and budgeted.memory_stats["recomputed_forwards"] == 2
    assert budgeted._held == 0
    assert free.memory_stats["recomputed_forwards"] == 0
    # a budget of two graphs keeps two and recomputes the third; what is held never exceeds it
    sizer = _plain(stage)
    x, tokens, _, _ = _inputs(stage, 1)
    sizer.forward(1, x, tokens if sizer.needs_tokens else None)
    two = 2 * sizer._held
    assert two > 0
    w = _plain(stage, max_memory=two)
    for sid in (1, 2, 3):
        x, tokens, _, _ = _inputs(stage, sid)
        w.forward(sid, x, tokens if w.needs_tokens else None)
        assert w._held <= two
    assert w.memory_stats["recomputed_forwards"] == 1


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_hop_too_big_for_memory_is_retried_in_smaller_pieces(stage):
    ref = _round(_plain(stage))
    tight = OutOfMemoryAbove(stage, max_batch=1)  # only one sequence at a time fits
    got = _round(tight)
    _same(ref, got, exact=False)  # the same computation, summed over pieces: equal up to rounding
    assert tight.raised > 0 and tight.memory_stats["oom_retries"] == tight.raised


def test_a_transient_out_of_memory_drops_the_kept_graphs_and_retries_the_whole_hop():
    ref = _round(_plain(1))
    w = OutOfMemoryAbove(1, first_failures=0)
    x, tokens, _, grad = _inputs(1, 1)
    w.forward(1, x, tokens)
    held = w._held
    assert held > 0
    w.failures_left = 1  # another process takes the memory for a moment
    x2, tokens2, _, _ = _inputs(1, 2)
    w.forward(2, x2, tokens2)
    assert w.raised == 1 and w.max_memory == held // 2  # it held too much: the budget comes down
    assert w.memory_stats["dropped_graphs"] >= 1
    w.forward(3, *_inputs(1, 3)[:2])
    for sid in (1, 2, 3):
        w.backward(sid, _inputs(1, sid)[3])
    w.inner_step(0)
    assert all(torch.equal(a, b) for a, b in zip(ref["theta"].values(), w.theta().values()))


def test_a_failed_try_leaves_the_accumulated_gradients_untouched():
    w = OutOfMemoryAbove(2, max_batch=BATCH)
    x, tokens, targets, _ = _inputs(2, 1)
    w.forward_backward(1, x, targets, tokens)
    before = {n: p.grad.clone() for n, p in w.module.named_parameters() if p.grad is not None}
    w.max_batch, w.oom_waits = 0, (0.0,)  # now nothing fits, not even one sequence
    with pytest.raises(WorkerError, match="out of memory even one sequence at a time"):
        w.forward_backward(2, *_inputs(2, 2)[:1], _inputs(2, 2)[2], tokens)
    after = {n: p.grad for n, p in w.module.named_parameters() if p.grad is not None}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert w.samples_since_step == 1


def test_max_memory_flag_values():
    cpu = torch.device("cpu")
    assert parse_memory("24GiB", cpu) == 24 * 2**30 and parse_memory("500MB", cpu) == 500 * 10**6
    assert parse_memory("1e9", cpu) == 10**9 and parse_memory("none", cpu) is None
    assert parse_memory("auto", cpu) is None  # no budget on a CPU unless asked
    frac = parse_memory("0.25", cpu)
    assert frac is None or frac > 0  # a quarter of the RAM where the OS says how much there is
    for bad in ("lots", "-3GB", "12 parsecs"):
        with pytest.raises(ValueError, match="--max-memory"):
            parse_memory(bad, cpu)
    with pytest.raises(WorkerError, match="--max-memory"):
        _plain(0, max_memory="lots")

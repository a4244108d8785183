"""The sync-free trainer step computes what the plain reference loop computes (inner and outer steps),
the data feeder reads the run's batches ahead, and the history does not depend on how often it is read."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from resbm import data, outer
from resbm.config import ModelConfig
from resbm.feeder import BatchFeeder
from resbm.optim import OptimConfig, build_optimizer
from resbm.robust_merge import MergeParams, robust_merge
from resbm.stages import build_stages, run_pipeline
from resbm.timing import PhaseTimer, peak_flops_of
from resbm.train import train
from resbm.trainer import LoopSettings, Trainer

torch.set_num_threads(1)

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, n_stages=2, bottleneck_ratio=8)
OCFG = OptimConfig(total_steps=8, warmup_steps=2)
CPU = torch.device("cpu")


def _plain_loop(steps: int, batch: int, accum: int, outer_every: int = 0) -> tuple[list[float], list[nn.Module]]:
    """The reference loop written out: a float loss per micro-batch, a division per gradient, and the
    outer step through resbm.outer on CPU copies of the state."""
    stages = build_stages(CFG)
    holder = nn.ModuleList(stages)
    opt = build_optimizer(holder, OCFG)
    start = [{n: t.clone() for n, t in s.state_dict().items()} for s in stages]
    momentum: list = [None] * len(stages)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        for m in range(accum):
            total += run_pipeline(stages, *data.batch(0, step * accum + m, batch, CFG.seq_len)).loss
        for p in holder.parameters():
            p.grad.div_(accum)
        opt.step(step)
        losses.append(total / accum)
        if outer_every and (step + 1) % outer_every == 0:
            for i, s in enumerate(stages):
                pg = outer.pseudo_gradient(start[i], s.state_dict())
                merged, _ = robust_merge([(outer_every * accum, pg)], None, MergeParams())
                theta, momentum[i] = outer.nesterov_step(start[i], merged, momentum[i], lr=0.7, momentum_coef=0.9)
                s.load_state_dict(theta)
                start[i] = {n: t.clone() for n, t in s.state_dict().items()}
            opt = build_optimizer(holder, OCFG)
    return losses, stages


@pytest.mark.parametrize("outer_every", [0, 2])
def test_trainer_steps_equal_the_plain_reference_loop(outer_every):
    steps, batch, accum = 4, 2, 2
    want_losses, want = _plain_loop(steps, batch, accum, outer_every)
    stages = build_stages(CFG)
    trainer = Trainer(stages, CFG, OCFG, CPU, LoopSettings(batch_size=batch, accum=accum, outer_every=outer_every,
                                                           outer_lr=0.7, outer_momentum=0.9))
    got = [trainer.step(s) for s in range(steps)]
    trainer.close()
    assert [sum(x.tolist()) / accum for x in got] == want_losses
    for a, b in zip(stages, want):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


def test_history_is_the_same_whatever_the_logging_interval():
    kw = dict(batch_size=2, accum=2, device="cpu", progress=False, timing_warmup=1)
    every = train(CFG, OCFG, 5, log_every=1, **kw)
    rarely = train(CFG, OCFG, 5, log_every=4, **kw)
    assert every["step"] == rarely["step"] == list(range(5))
    assert every["loss"] == rarely["loss"]
    assert rarely["timing_warmup"] == 1 and rarely["steady_steps"] == 4
    assert rarely["steady_tokens_per_s"] > 0 and rarely["steady_mfu"] is None  # no GPU peak on a CPU


def test_train_refuses_a_merge_that_one_replica_cannot_take():
    with pytest.raises(ValueError, match="one replica"):
        train(CFG, OCFG, 2, device="cpu", progress=False, outer_every=1, merge_method="trimmed-mean")
    with pytest.raises(ValueError, match="clip_factor"):
        train(CFG, OCFG, 2, device="cpu", progress=False, outer_every=1, merge_method="clipped-mean",
              clip_factor=0.5)
    with pytest.raises(ValueError, match="log_every"):
        train(CFG, OCFG, 2, device="cpu", progress=False, log_every=0)
    with pytest.raises(ValueError, match="amp"):
        Trainer(build_stages(CFG), CFG, OCFG, CPU, LoopSettings(amp=True))


def test_feeder_reads_the_runs_batches_ahead_on_a_thread():
    feeder = BatchFeeder(seed=3, batch_size=2, seq_len=16, accum=2, device=CPU, depth=2)
    try:
        for step in (0, 1, 5):  # 5: the steps in between are dropped, not served late
            got = feeder.get(step)
            assert len(got) == 2
            for m, (tokens, targets) in enumerate(got):
                want = data.batch(3, step * 2 + m, 2, 16)
                assert torch.equal(tokens, want[0]) and torch.equal(targets, want[1])
        assert sorted(feeder._ahead) == [6, 7]
    finally:
        feeder.close()
    with pytest.raises(ValueError, match="depth"):
        BatchFeeder(0, 1, 8, 1, CPU, depth=-1)


def test_phase_timer_sums_each_phase_and_a_disabled_one_records_nothing():
    timer = PhaseTimer(CPU)
    for _ in range(3):
        with timer.phase("a"):
            torch.ones(10).sum()
    with timer.phase("b"):
        pass
    totals = timer.totals()
    assert set(totals) == {"a", "b"} and all(v >= 0 for v in totals.values())
    assert set(timer.host) == {"a", "b"}
    timer.reset()
    assert timer.totals() == {}
    off = PhaseTimer(CPU, enabled=False)
    with off.phase("a"):
        pass
    assert off.totals() == {} and not off.host


def test_peak_flops_by_gpu_name():
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA H200") == peak_flops_of("NVIDIA GH200 480GB") == 989e12
    assert peak_flops_of("Some Future GPU") is None


@pytest.mark.parametrize("argv,needle", [(["--amp"], "amp"), (["--ratio", "7"], "bottleneck_ratio"),
                                         (["--log-every", "0"], "log_every")])
def test_cli_misconfiguration_is_one_line_and_exit_code_2(argv, needle, capsys):
    from resbm.train import main
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--no-progress", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]

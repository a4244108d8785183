"""Single-process reference trainer: every stage in sequence, exactly as the pipeline computes it.

    python -m resbm.train --preset small --steps 200
    python -m resbm.train --preset 1b --device cuda --amp --batch-size 16 --accum 4 --steps 40 --val-every 0

Step t consumes micro-batches with sample ids t*A .. t*A+A-1 from `data.batch(seed, id)`.
Each micro-batch's unscaled loss is backpropagated through the stages (codes and gradients
pass through the wire fake-quantiser); before the optimizer step the accumulated gradients are
divided by the number of micro-batches, so they are the mean over the step's samples, as
miners compute them. `resbm.trainer.Trainer` runs a step without reading anything back from the
device; losses are read every `log_every` steps.

With `outer_every=H` the trainer also runs the DiLoCo-style round structure of the subnet: every
H inner steps each stage takes an outer step (pseudo-gradient, merge over its one replica,
Nesterov) exactly as a miner does, computed on the weights' device (`resbm.outer_local`), and the
inner optimizer starts fresh. Round r then consumes sample ids r*H*A .. (r+1)*H*A-1, the ids the
bridge mints for round r when samples_per_round = H*A.

Throughput: `tokens_per_s` and `mfu` cover every step; `steady_tokens_per_s` and `steady_mfu`
exclude the first `timing_warmup` steps (kernel selection, allocator growth, compilation) and the
time spent validating and checkpointing.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data
from .checkpoint import load_checkpoint, save_checkpoint
from .config import BOUNDARY_KINDS, PRESETS, ModelConfig
from .device import pick_device
from .evaluate import evaluate_lm
from .optim import MUON_IMPLS, OptimConfig
from .outer_local import one_replica_merge_is_identity
from .stages import build_stages, merge_stage_states, pipeline_logits, run_pipeline, stage_state_dict
from .timing import mfu, peak_flops, synchronize
from .trainer import LoopSettings, Trainer

__all__ = ["evaluate", "main", "train"]

log = logging.getLogger(__name__)

_peak_flops = peak_flops  # the name scripts/bench_gpu_subnet.py imports


def _progress(steps: range, show: bool) -> Any:
    """A tqdm bar when asked for and installed (the `local` extra); else the plain range."""
    if show:
        try:
            from tqdm import tqdm
            return tqdm(steps, desc="train", unit="step")
        except ImportError:
            pass
    return _Quiet(steps)


class _Quiet(list):
    """The steps, with tqdm's `set_postfix` as a no-op."""

    def set_postfix(self, **_: Any) -> None:
        pass


def evaluate(stages: list[nn.Module], batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> float:
    """Mean held-out loss (nats/token) of the stages run in sequence: resbm.evaluate's figure."""
    return evaluate_lm(lambda t: pipeline_logits(stages, t), batches, device=device).loss


class _Clock:
    """Wall time of the steady-state steps: starts after the warm-up, pauses for validation/checkpoints."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.paused, self.steps = device, None, 0.0, 0

    def begin(self) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def pause_for(self, fn: Any) -> Any:
        synchronize(self.device)
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.paused += time.perf_counter() - t

    def seconds(self) -> float | None:
        if self.start is None:
            return None
        synchronize(self.device)
        return time.perf_counter() - self.start - self.paused


def _check_settings(*, steps: int, batch_size: int, accum: int, log_every: int, timing_warmup: int,
                    outer_every: int, resume: str | None, merge_method: str, clip_factor: float, muon_impl: str,
                    amp: bool, dev: torch.device) -> None:
    """Raise ValueError naming the first setting train() cannot run with."""
    if steps < 0 or batch_size < 1 or accum < 1 or log_every < 1 or timing_warmup < 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, accum >= 1, log_every >= 1, timing_warmup >= 0; "
                         f"got {steps}, {batch_size}, {accum}, {log_every}, {timing_warmup}")
    if outer_every < 0:
        raise ValueError(f"outer_every must be >= 0 (0 = no outer step), got {outer_every}")
    if outer_every and resume:
        raise ValueError("resume with outer_every is not supported: checkpoints hold no outer momentum")
    if outer_every and not one_replica_merge_is_identity(merge_method, clip_factor):
        raise ValueError(f"merge_method {merge_method!r} with clip_factor {clip_factor} does not apply to the "
                         "reference's one replica per stage; use robust, mean, or clipped-mean with clip_factor >= 1")
    if muon_impl not in MUON_IMPLS:
        raise ValueError(f"muon_impl must be one of {list(MUON_IMPLS)}, got {muon_impl!r}")
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) needs a CUDA device, got {dev}; drop --amp or pick a CUDA device")


def train(cfg: ModelConfig, ocfg: OptimConfig, steps: int, *, batch_size: int = 8, accum: int = 1,
          seed: int = 0, init_seed: int = 0, device: str = "auto", val_every: int = 0,
          val_batches: int = 4, ckpt_dir: str | None = None, ckpt_every: int = 0,
          resume: str | None = None, progress: bool = True, amp: bool = False,
          outer_every: int = 0, outer_lr: float = 1.0, outer_momentum: float = 0.0,
          merge_method: str = "clipped-mean", clip_factor: float = 2.0, compile: bool = False,
          log_every: int = 10, timing_warmup: int = 2, muon_impl: str = "batched") -> dict[str, Any]:
    """Train for `steps` optimizer steps (total, counting resumed ones); returns the history dict
    {step, loss, val_step, val_loss, tokens_per_s, wire_bytes_per_token, mfu, steady_tokens_per_s,
    steady_mfu, steady_steps, timing_warmup}. `amp` runs the forwards under bf16 autocast (CUDA only;
    the exactness tests use fp32). `outer_every` > 0 adds an outer step (outer_lr, outer_momentum,
    merge_method, clip_factor as in RunConfig) after every `outer_every` inner steps, with a fresh inner
    optimizer each round. `compile` torch.compiles the blocks; losses are read every `log_every` steps."""
    dev = pick_device(device)
    _check_settings(steps=steps, batch_size=batch_size, accum=accum, log_every=log_every,
                    timing_warmup=timing_warmup, outer_every=outer_every, resume=resume,
                    merge_method=merge_method, clip_factor=clip_factor, muon_impl=muon_impl, amp=amp, dev=dev)
    stages = build_stages(cfg, seed=init_seed)
    for stage in stages:
        stage.to(dev)
    settings = LoopSettings(batch_size=batch_size, accum=accum, seed=seed, amp=amp, compile=compile,
                            outer_every=outer_every, outer_lr=outer_lr, outer_momentum=outer_momentum,
                            muon_impl=muon_impl)
    trainer = Trainer(stages, cfg, ocfg, dev, settings)
    try:
        return _run(trainer, steps, val_every=val_every, val_batches=val_batches, ckpt_dir=ckpt_dir,
                    ckpt_every=ckpt_every, resume=resume, progress=progress, log_every=log_every,
                    timing_warmup=timing_warmup)
    finally:
        trainer.close()


def _run(trainer: Trainer, steps: int, *, val_every: int, val_batches: int, ckpt_dir: str | None,
         ckpt_every: int, resume: str | None, progress: bool, log_every: int, timing_warmup: int
         ) -> dict[str, Any]:
    cfg, ocfg, dev, stages = trainer.cfg, trainer.ocfg, trainer.device, trainer.stages
    accum, batch_size = trainer.settings.accum, trainer.settings.batch_size
    start = 0
    if resume:
        ckpt = load_checkpoint(resume, optimizer=trainer.opt, expect_config=cfg)
        for s, stage in enumerate(stages):
            stage.load_state_dict(stage_state_dict(ckpt.state, cfg, s))
        start = ckpt.step
        log.info("resumed from %s at step %d", resume, start)
    val_set = data.validation_batches(val_batches, batch_size, cfg.seq_len) if val_every else []
    hist: dict[str, Any] = {"step": [], "loss": [], "val_step": [], "val_loss": []}
    pending: list[tuple[int, torch.Tensor]] = []
    bar = _progress(range(start, steps), progress)

    def read_losses() -> None:  # the one device sync of a logging interval
        if not pending:
            return
        rows = torch.stack([loss for _, loss in pending]).cpu().tolist()
        for (step, _), row in zip(pending, rows):
            hist["step"].append(step)
            hist["loss"].append(sum(row) / accum)  # a Python sum of the fp32 values, as run_pipeline's floats
        pending.clear()

    t0, done = time.perf_counter(), 0
    warm = min(timing_warmup, max(0, steps - start - 1))
    clock = _Clock(dev)
    for step in bar:
        if done == warm:
            clock.begin()
        pending.append((step, trainer.step(step)))
        done += 1
        last = step + 1 == steps
        if done % log_every == 0 or last:
            read_losses()
            tps = done * trainer.tokens_per_step / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{hist['loss'][-1]:.4f}", tok_s=f"{tps:,.0f}")
        if val_every and ((step + 1) % val_every == 0 or last):
            vl = clock.pause_for(lambda: evaluate(stages, val_set, dev))
            hist["val_step"].append(step + 1)
            hist["val_loss"].append(vl)
            log.info("step %d val loss %.4f", step + 1, vl)
        if ckpt_dir and ckpt_every and (step + 1) % ckpt_every == 0:
            clock.pause_for(lambda: _save(ckpt_dir, stages, cfg, step + 1, trainer.opt, ocfg))
    read_losses()
    steady = clock.seconds()
    elapsed = time.perf_counter() - t0
    if ckpt_dir and done:
        _save(ckpt_dir, stages, cfg, steps, trainer.opt, ocfg)
    hist["tokens_per_s"] = done * trainer.tokens_per_step / elapsed if done else 0.0
    hist["wire_bytes_per_token"] = cfg.wire_bytes_per_token(batch_size) if cfg.n_stages > 1 else 0.0
    hist["mfu"] = mfu(cfg.flops_per_token(), hist["tokens_per_s"], dev)
    hist["timing_warmup"] = warm
    hist["steady_steps"] = done - warm if steady is not None else 0
    hist["steady_tokens_per_s"] = hist["steady_steps"] * trainer.tokens_per_step / steady if steady else None
    hist["steady_mfu"] = (mfu(cfg.flops_per_token(), hist["steady_tokens_per_s"], dev)
                          if hist["steady_tokens_per_s"] else None)
    return hist


def _save(ckpt_dir: str, stages: list[nn.Module], cfg: ModelConfig, step: int, opt: Any,
          ocfg: OptimConfig) -> None:
    state = merge_stage_states([s.state_dict() for s in stages], cfg)
    save_checkpoint(ckpt_dir, state, cfg, step, optimizer=opt, extra={"optim_config": ocfg.to_dict()})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resbm-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size preset")
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (A)")
    p.add_argument("--seed", type=int, default=0, help="data seed (run seed of data.batch)")
    p.add_argument("--init-seed", type=int, default=0, help="weight initialisation seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--stages", type=int, default=None, help="override n_stages of the preset")
    p.add_argument("--boundary", default=None, choices=BOUNDARY_KINDS, help="override boundary kind")
    p.add_argument("--variant", default=None, help="override boundary variant (see resbm/boundary.py)")
    p.add_argument("--token-reinject", default=None, action=argparse.BooleanOptionalAction,
                   help="override token re-injection at stages > 0 (default: the preset's, on)")
    p.add_argument("--codec", default=None, help="override wire codec: fp32 | bf16 | fp8 | int8")
    p.add_argument("--ratio", type=int, default=None, help="override bottleneck ratio r (k = d / r)")
    p.add_argument("--optimizer", default="muon", choices=["muon", "adamw"], help="inner optimizer kind")
    p.add_argument("--muon-lr", type=float, default=OptimConfig.muon_lr, help="Muon peak lr")
    p.add_argument("--adamw-lr", type=float, default=OptimConfig.adamw_lr, help="AdamW peak lr")
    p.add_argument("--warmup", type=int, default=OptimConfig.warmup_steps, help="warmup steps")
    p.add_argument("--val-every", type=int, default=50, help="validate every N steps (0: never)")
    p.add_argument("--val-batches", type=int, default=4, help="validation batches per evaluation")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory (written at the end)")
    p.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--history-out", default=None, help="write the loss history (and args) as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the forward (CUDA only)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (opt-in; the first steps pay the compile time)")
    p.add_argument("--muon-impl", default="batched", choices=MUON_IMPLS,
                   help="Muon implementation: batched Newton-Schulz (resbm/muon.py) or torch.optim.Muon")
    p.add_argument("--log-every", type=int, default=10, help="read the losses back every N steps (a device sync)")
    p.add_argument("--timing-warmup", type=int, default=2,
                   help="steps left out of the steady-state tokens/s and MFU (kernel selection, compilation)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[ModelConfig, OptimConfig]:
    """ModelConfig and OptimConfig from parsed CLI arguments."""
    over: dict[str, Any] = {}
    if args.stages is not None:
        over["n_stages"] = args.stages
    if args.boundary is not None:
        over["boundary"] = args.boundary
    if args.variant is not None:
        over["boundary_variant"] = args.variant
    if getattr(args, "token_reinject", None) is not None:  # absent from older golden-file args
        over["token_reinject"] = args.token_reinject
    if args.codec is not None:
        over["wire_codec"] = args.codec
    if args.ratio is not None:
        over["bottleneck_ratio"] = args.ratio
    cfg = ModelConfig.preset(args.preset, **over)
    ocfg = OptimConfig(kind=args.optimizer, muon_lr=args.muon_lr, adamw_lr=args.adamw_lr,
                       warmup_steps=args.warmup, total_steps=max(1, args.steps))
    return cfg, ocfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the history."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # a bad setting is one line and exit code 2 (USAGE, as argparse's own errors), no traceback
        cfg, ocfg = config_from_args(args)
        _check_settings(steps=args.steps, batch_size=args.batch_size, accum=args.accum, log_every=args.log_every,
                        timing_warmup=args.timing_warmup, outer_every=0, resume=args.resume,
                        merge_method="clipped-mean", clip_factor=2.0, muon_impl=args.muon_impl, amp=args.amp,
                        dev=pick_device(args.device))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if pick_device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (CLI only)
    hist = train(cfg, ocfg, args.steps, batch_size=args.batch_size, accum=args.accum, seed=args.seed,
                 init_seed=args.init_seed, device=args.device, val_every=args.val_every,
                 val_batches=args.val_batches, ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every,
                 resume=args.resume, progress=not args.no_progress, amp=args.amp, compile=args.compile,
                 log_every=args.log_every, timing_warmup=args.timing_warmup, muon_impl=args.muon_impl)
    if args.history_out:
        record = {"args": {k: v for k, v in vars(args).items() if k not in ("history_out", "no_progress")},
                  **hist}
        Path(args.history_out).write_text(json.dumps(record, indent=1) + "\n")
    last = hist["loss"][-1] if hist["loss"] else float("nan")
    val = hist["val_loss"][-1] if hist["val_loss"] else float("nan")
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"  # noqa: E731
    steady = (f"{hist['steady_tokens_per_s']:,.0f} tok/s, MFU {pct(hist['steady_mfu'])} over "
              f"{hist['steady_steps']} steady-state steps (first {hist['timing_warmup']} excluded)"
              if hist["steady_tokens_per_s"] else "no steady-state steps")
    print(f"done: {args.steps} steps | loss {last:.4f} | val {val:.4f} | {hist['tokens_per_s']:,.0f} tok/s, "
          f"MFU {pct(hist['mfu'])} over all steps | {steady} | wire {hist['wire_bytes_per_token']:.2f} "
          f"B/token/boundary (fwd+bwd, {cfg.wire_codec}, k={cfg.code_dim})")
    return hist


if __name__ == "__main__":
    main()

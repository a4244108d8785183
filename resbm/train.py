"""Single-process reference trainer: every stage in sequence, exactly as the pipeline computes it.

    python -m resbm.train --preset small --steps 200

Step t consumes micro-batches with sample ids t*A .. t*A+A-1 from `data.batch(seed, id)`.
Each micro-batch's unscaled loss is backpropagated through the stages (codes and gradients
pass through the wire fake-quantiser); before the optimizer step the accumulated gradients are
divided by the number of micro-batches, so they are the mean over the step's samples, as
miners compute them.

With `outer_every=H` the trainer also runs the DiLoCo-style round structure of the subnet: every
H inner steps each stage takes an outer step with `resbm.outer` (pseudo-gradient, merge over its
one replica, Nesterov) exactly as a miner does, and the inner optimizer starts fresh. Round r then
consumes sample ids r*H*A .. (r+1)*H*A-1, the ids the bridge mints for round r when
samples_per_round = H*A.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data, outer
from .checkpoint import load_checkpoint, save_checkpoint
from .config import BOUNDARY_KINDS, PRESETS, ModelConfig
from .device import pick_device
from .optim import OptimConfig, build_optimizer
from .robust_merge import MergeParams, robust_merge
from .evaluate import evaluate_lm
from .stages import build_stages, merge_stage_states, pipeline_logits, run_pipeline, stage_state_dict

__all__ = ["evaluate", "main", "train"]

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by GPU name fragment, for the MFU estimate.
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


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


def train(cfg: ModelConfig, ocfg: OptimConfig, steps: int, *, batch_size: int = 8, accum: int = 1,
          seed: int = 0, init_seed: int = 0, device: str = "auto", val_every: int = 0,
          val_batches: int = 4, ckpt_dir: str | None = None, ckpt_every: int = 0,
          resume: str | None = None, progress: bool = True, amp: bool = False,
          outer_every: int = 0, outer_lr: float = 1.0, outer_momentum: float = 0.0,
          merge_method: str = "clipped-mean", clip_factor: float = 2.0) -> dict[str, Any]:
    """Train for `steps` optimizer steps (total, counting resumed ones); returns the history dict
    {step, loss, val_step, val_loss, tokens_per_s, wire_bytes_per_token, mfu}. `amp` runs the
    forward under bf16 autocast (CUDA only; the exactness tests use fp32). `outer_every` > 0 adds
    an outer step (outer_lr, outer_momentum, merge_method, clip_factor as in RunConfig) after
    every `outer_every` inner steps, with a fresh inner optimizer each round."""
    if steps < 0 or batch_size < 1 or accum < 1:
        raise ValueError(f"need steps >= 0, batch_size >= 1, accum >= 1; got {steps}, {batch_size}, {accum}")
    if outer_every < 0:
        raise ValueError(f"outer_every must be >= 0 (0 = no outer step), got {outer_every}")
    if outer_every and resume:
        raise ValueError("resume with outer_every is not supported: checkpoints hold no outer momentum")
    dev = pick_device(device)
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) needs a CUDA device, got {dev}")
    stages = build_stages(cfg, seed=init_seed)
    holder = nn.ModuleList(stages)
    opt = build_optimizer(holder, ocfg)
    start = 0
    holder.to(dev)
    if resume:
        ckpt = load_checkpoint(resume, optimizer=opt, expect_config=cfg)
        for s, stage in enumerate(stages):
            stage.load_state_dict(stage_state_dict(ckpt.state, cfg, s))
        start = ckpt.step
        log.info("resumed from %s at step %d", resume, start)
    val_set = data.validation_batches(val_batches, batch_size, cfg.seq_len) if val_every else []
    hist: dict[str, Any] = {"step": [], "loss": [], "val_step": [], "val_loss": []}
    tokens_per_step = accum * batch_size * cfg.seq_len
    rounds = _OuterRounds(stages, outer_every, outer_lr, outer_momentum, merge_method, clip_factor,
                          accum) if outer_every else None
    t0, done = time.perf_counter(), 0
    bar = _progress(range(start, steps), progress)
    for step in bar:
        opt.zero_grad()
        total = 0.0
        for m in range(accum):
            tokens, targets = data.batch(seed, step * accum + m, batch_size, cfg.seq_len)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                total += run_pipeline(stages, tokens.to(dev), targets.to(dev)).loss
        for p in holder.parameters():
            if p.grad is not None:
                p.grad.div_(accum)
        opt.step(step)
        if rounds is not None and (step + 1) % outer_every == 0:
            rounds.outer_step()
            opt = build_optimizer(holder, ocfg)  # inner optimizer state starts fresh each round
        loss = total / accum
        hist["step"].append(step)
        hist["loss"].append(loss)
        done += 1
        tps = done * tokens_per_step / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
        if val_every and ((step + 1) % val_every == 0 or step + 1 == steps):
            vl = evaluate(stages, val_set, dev)
            hist["val_step"].append(step + 1)
            hist["val_loss"].append(vl)
            log.info("step %d val loss %.4f", step + 1, vl)
        if ckpt_dir and ckpt_every and (step + 1) % ckpt_every == 0:
            _save(ckpt_dir, stages, cfg, step + 1, opt, ocfg)
    if ckpt_dir and done:
        _save(ckpt_dir, stages, cfg, steps, opt, ocfg)
    elapsed = time.perf_counter() - t0
    hist["tokens_per_s"] = done * tokens_per_step / elapsed if done else 0.0
    hist["wire_bytes_per_token"] = cfg.wire_bytes_per_token(batch_size) if cfg.n_stages > 1 else 0.0
    peak = _peak_flops(dev)
    hist["mfu"] = cfg.flops_per_token() * hist["tokens_per_s"] / peak if peak else None
    return hist


class _OuterRounds:
    """Per-stage round start weights and outer momentum; the outer step as miners compute it."""

    def __init__(self, stages: list[nn.Module], every: int, lr: float, momentum: float,
                 method: str, clip_factor: float, samples_per_step: int) -> None:
        self.stages, self.lr, self.mu = stages, lr, momentum
        self.method, self.clip = method, clip_factor
        self.samples = every * samples_per_step
        self.start = [self._theta(s) for s in stages]
        self.momentum: list[dict[str, torch.Tensor] | None] = [None] * len(stages)

    @staticmethod
    def _theta(stage: nn.Module) -> dict[str, torch.Tensor]:
        sd = stage.state_dict()
        return {n: sd[n].detach().to("cpu", torch.float32).clone() for n in sorted(sd)}

    def outer_step(self) -> None:
        """theta <- Nesterov(theta_start, merge([pseudo-gradient])) for every stage."""
        for i, stage in enumerate(self.stages):
            pg = outer.pseudo_gradient(self.start[i], self._theta(stage))
            if self.method == "robust":  # the subnet's rule; with one replica it is the identity
                merged, _ = robust_merge([(self.samples, pg)], None, MergeParams(clip_factor=self.clip))
            else:
                merged = outer.merge([(self.samples, pg)], method=self.method, clip_factor=self.clip)
            theta, self.momentum[i] = outer.nesterov_step(self.start[i], merged, self.momentum[i],
                                                          lr=self.lr, momentum_coef=self.mu)
            with torch.no_grad():
                stage.load_state_dict(theta, strict=True)
            self.start[i] = self._theta(stage)


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
    cfg, ocfg = config_from_args(args)
    if pick_device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (CLI only)
    hist = train(cfg, ocfg, args.steps, batch_size=args.batch_size, accum=args.accum, seed=args.seed,
                 init_seed=args.init_seed, device=args.device, val_every=args.val_every,
                 val_batches=args.val_batches, ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every,
                 resume=args.resume, progress=not args.no_progress, amp=args.amp)
    if args.history_out:
        record = {"args": {k: v for k, v in vars(args).items() if k not in ("history_out", "no_progress")},
                  **hist}
        Path(args.history_out).write_text(json.dumps(record, indent=1) + "\n")
    last = hist["loss"][-1] if hist["loss"] else float("nan")
    val = hist["val_loss"][-1] if hist["val_loss"] else float("nan")
    mfu = f"{100 * hist['mfu']:.1f}%" if hist["mfu"] is not None else "n/a"
    print(f"done: {args.steps} steps | loss {last:.4f} | val {val:.4f} | {hist['tokens_per_s']:,.0f} tok/s | "
          f"wire {hist['wire_bytes_per_token']:.2f} B/token/boundary (fwd+bwd, {cfg.wire_codec}, "
          f"k={cfg.code_dim}) | MFU {mfu}")
    return hist


if __name__ == "__main__":
    main()

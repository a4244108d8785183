"""The reference trainer's speed: a grid of loop / optimizer / shape variants, one table.

    python3 scripts/bench_trainer.py --preset 1b --out trainer_grid.json          # one H100: < 6 min
    python3 scripts/bench_trainer.py --preset tiny --device cpu                   # CPU smoke run

Every variant builds the stages afresh (the run's initialisation, drawn once per process), runs
W warm-up steps that are NOT timed (kernel selection, allocator growth, torch.compile), then N
timed optimizer steps. Per variant it prints tokens/s and MFU over the timed steps, and where a
step's time goes: each phase (data, forward+backward, gradient mean, Muon, AdamW, outer step) is
bracketed by CUDA events, so a phase's time is the GPU's time between the host entering and
leaving it (idle gaps the host leaves, e.g. after a sync, land in the phase where they happen);
`other` is the rest of the step's wall time. `syncs` counts host syncs per step. MFU uses
resbm's FLOP estimate (ModelConfig.flops_per_token: 6 x matmul params + 12 x layers x d x seq per
token) over the GPU's dense bf16 peak. A variant that fails (OOM, compile error) shows its error in
its row and the grid goes on; variants that would start after --budget-s are skipped. CUDA-only
variants (compile, forced attention kernels) are skipped on a CPU unless named in --variants.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resbm.config import PRESETS, ModelConfig  # noqa: E402
from resbm.device import pick_device  # noqa: E402
from resbm.muon import BatchedMuon  # noqa: E402
from resbm.optim import split_params  # noqa: E402
from scripts.bench_trainer_common import (Run, build_stages_on, device_banner, format_table,  # noqa: E402
                                          free_device, run_setting)

__all__ = ["default_grid", "main", "muon_agreement"]


def default_grid() -> list[Run]:
    """Baseline (the loop before issue 22) at 16K tokens per step, then one change at a time, then
    larger steps (tokens per step = batch x accum x seq: 8 x 2 x 1024 = 16K at the 1b preset)."""
    return [
        Run("legacy-16k", 8, 2, loop="legacy", muon="torch", fused_adamw=False, fused_proj=False,
            note="the loop before issue 22: a batch copy and a loss read-back (2 host syncs) per micro-batch, "
                 "a division per gradient; torch.optim.Muon, foreach AdamW, separate q/k/v and gate/up products"),
        Run("fast-16k-oldopt", 8, 2, muon="torch", fused_adamw=False, fused_proj=False,
            note="legacy-16k with the new loop only (no syncs, batches read ahead, one foreach division)"),
        Run("fast-16k-torchmuon", 8, 2, muon="torch", note="+ fused AdamW and fused projections"),
        Run("fast-16k", 8, 2, note="+ batched Muon: the new default"),
        Run("fast-16k-unfusedproj", 8, 2, fused_proj=False, note="fast-16k with separate q/k/v and gate/up products"),
        Run("fast-64k", 8, 8),
        Run("fast-64k-b16", 16, 4),
        Run("fast-128k-b16", 16, 8),
        Run("fast-64k-b16-outer4", 16, 4, outer_every=4,
            note="outer step after every 4th step (timed window: 1 of 5 steps)"),
        Run("fast-64k-b16-cudnn", 16, 4, sdpa="cudnn", cuda_only=True, note="cuDNN attention forced"),
        Run("fast-64k-b16-compile", 16, 4, compile=True, cuda_only=True,
            note="torch.compile per block; warm-up s = compile"),
        Run("fast-128k-b16-compile", 16, 8, compile=True, cuda_only=True,
            note="torch.compile per block (compiler caches warm)"),
    ]


def muon_agreement(cfg: ModelConfig, dev: torch.device, seed: int, cache: dict) -> dict[str, Any]:
    """One Muon step of stage 1's matrices by BatchedMuon and by torch.optim.Muon from the same weights,
    momentum and gradients: the largest relative difference of a matrix's update, and each step's time."""
    free_device(dev)
    stage = build_stages_on(cfg, seed, dev, cache)[min(1, cfg.n_stages - 1)]
    names = set(split_params(stage)[0])
    params = [p for n, p in stage.named_parameters() if n in names]
    gen = torch.Generator(device=dev).manual_seed(seed)
    grads = [torch.randn(p.shape, device=dev, generator=gen) * 1e-3 for p in params]
    out: dict[str, Any] = {"matrices": len(params)}
    updates = {}
    for impl, cls in (("batched", BatchedMuon), ("torch", torch.optim.Muon)):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = cls(copies, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn="original")
        for _ in range(3):  # warm-up steps build the momentum (and the kernels)
            for c, g in zip(copies, grads):
                c.grad = g
            opt.step()
        before = [c.detach().clone() for c in copies]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out[f"{impl}_step_s"] = time.perf_counter() - t0
        updates[impl] = [c.detach() - b for c, b in zip(copies, before)]
    rel = [float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(updates["batched"], updates["torch"])]
    out["max_rel_update_diff"] = max(rel)
    del stage, params, grads, updates
    free_device(dev)
    return out


def _row(rec: dict[str, Any]) -> list[str]:
    run = rec["run"]
    tok = f"{rec['tokens_per_step'] // 1024}K"
    if "error" in rec or "skipped" in rec:
        return [run["name"], tok, *["-"] * (len(HEADER) - 3), rec.get("error") or rec["skipped"]]
    step = rec["step_s"]
    ph = rec["phase_s_per_step"]
    pct = lambda v: f"{100 * v / step:.1f}%"  # noqa: E731
    syncs = 2 * run["accum"] if run["loop"] == "legacy" else 0
    peak = f"{rec['peak_gib']:.1f}" if rec.get("peak_gib") is not None else "-"
    return [run["name"], tok, f"{rec['tokens_per_s']:,.0f}",
            f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "n/a", f"{1e3 * step:.0f}",
            pct(ph["fwd_bwd"]), f"{1e3 * ph['muon']:.0f} ({pct(ph['muon'])})", pct(ph["adamw"]), pct(ph["data"]),
            pct(ph["grad_mean"]), pct(ph["outer"]), pct(rec["other_s_per_step"]), str(syncs), peak,
            f"{rec['warmup_s']:.1f}", f"{rec['loss_last']:.3f}"]


HEADER = ["variant", "tok/step", "tok/s", "MFU", "step ms", "fwd+bwd", "muon ms (%)", "adamw", "data", "grad mean",
          "outer", "other", "syncs/step", "peak GiB", "warm-up s", "loss"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="1b", choices=sorted(PRESETS), help="model preset (default 1b)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per variant (2 on CUDA, 1 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (5 on CUDA, 2 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU device)")
    p.add_argument("--variants", default=None, help="comma-separated variant names (default: the whole grid)")
    p.add_argument("--list", action="store_true", help="print the grid's variants and exit")
    p.add_argument("--budget-s", type=float, default=330.0, help="start no variant after this many seconds")
    p.add_argument("--no-muon-check", action="store_true", help="skip the batched-vs-torch Muon agreement check")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--out", default=None, help="write every measurement as JSON here")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the grid; print the table last; return the records."""
    args = _parser().parse_args(argv)
    grid = default_grid()
    if args.list:
        for r in grid:
            print(f"{r.name:24s} batch {r.batch:3d} x accum {r.accum:2d}  {r.note}")
        return []
    t_start = time.perf_counter()
    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    args.warmup = (2 if cuda else 1) if args.warmup is None else args.warmup
    args.steps = (5 if cuda else 2) if args.steps is None else args.steps
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    if args.warmup < 0 or args.steps < 1:
        raise SystemExit("--warmup must be >= 0 and --steps >= 1")
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(wanted) - {r.name for r in grid})
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; --list shows the grid")
        grid = [r for r in grid if r.name in wanted]
    elif dev.type != "cuda":
        grid = [r for r in grid if not r.cuda_only]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig.preset(args.preset)
    amp = dev.type == "cuda"
    print(device_banner(dev, cfg))
    print(f"each variant: {args.warmup} warm-up steps (not timed), then {args.steps} timed steps; "
          f"{'bf16 autocast' if amp else 'fp32'}", flush=True)
    cache: dict = {}
    records: list[dict[str, Any]] = []
    for run in grid:
        if time.perf_counter() - t_start > args.budget_s:
            records.append({"run": run.__dict__, "tokens_per_step": run.batch * run.accum * cfg.seq_len,
                            "skipped": f"skipped: past the {args.budget_s:.0f} s budget"})
            continue
        rec = run_setting(cfg, run, dev, warmup=args.warmup, steps=args.steps, seed=args.seed, cache=cache, amp=amp)
        records.append(rec)
        print(f"  {run.name}: " + (rec.get("error") or f"{rec['tokens_per_s']:,.0f} tok/s, step "
                                   f"{1e3 * rec['step_s']:.0f} ms, warm-up {rec['warmup_s']:.1f} s"), flush=True)
    muon = None
    if not args.no_muon_check and time.perf_counter() - t_start <= args.budget_s:
        muon = muon_agreement(cfg, dev, args.seed, cache)
    total = time.perf_counter() - t_start
    if args.out:
        Path(args.out).write_text(json.dumps({"preset": args.preset, "device": str(dev), "total_s": total,
                                              "muon_agreement": muon, "records": records}, indent=1) + "\n")
    if muon:
        print(f"Muon, stage 1's {muon['matrices']} matrices, one step: batched {1e3 * muon['batched_step_s']:.1f} ms, "
              f"torch.optim.Muon {1e3 * muon['torch_step_s']:.1f} ms; largest relative difference of an update "
              f"{muon['max_rel_update_diff']:.2e} (bf16 Newton-Schulz in both)")
    for r in grid:
        print(f"  {r.name}: batch {r.batch} x accum {r.accum}" + (f"; {r.note}" if r.note else ""))
    print(f"grid done in {total:.0f} s; phases are % of the step's wall time (CUDA events); other = the rest "
          f"of the wall time; warm-up s = the {args.warmup} untimed steps (compilation included)")
    print(format_table(HEADER, [_row(r) for r in records]))
    return records


if __name__ == "__main__":
    main()

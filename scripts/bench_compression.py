"""Compression quality benchmark: train one model under each boundary setting, print one table.

Every setting starts from the same initialisation (init seed 0) and reads the same batches in the
same order (`resbm.data.batch(seed, step)`), so the only differences are the boundary, its wire
codec and the optimizer. The standard run (one H100, bf16 autocast, monolithic model, which
equals the staged pipeline exactly):

    python3 scripts/bench_compression.py --size bench --steps 1000 --out runs/bench
    python3 scripts/bench_compression.py --report runs/bench --plot docs/compression_loss.png

`--tiny` is a CPU smoke run of the whole grid in seconds. `--shard i/n` runs every n-th setting,
so n processes can share one GPU; `--timing` runs each setting alone for a few steps to measure
step time and peak memory without neighbours. Results are one JSON file per setting under --out;
`--report` merges a folder (or several) into the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import datetime as _dt
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resbm import data  # noqa: E402
from resbm.config import ModelConfig  # noqa: E402
from resbm.model import build_model, lm_loss  # noqa: E402
from resbm.optim import OptimConfig, build_optimizer  # noqa: E402
from scripts.bench_compression_variants import (DEC_MODS, ModDecoder, TokenReinjection,  # noqa: E402
                                                apply_round2, split_boundary_lr)
from scripts.bench_compression_report import fmt, format_table, load_results, plot_curves, summarise  # noqa: E402

__all__ = ["DEC_MODS", "SIZES", "ModDecoder", "Setting", "apply_round2", "default_grid", "format_table",
           "load_results", "main", "plot_curves", "run_setting", "split_boundary_lr", "summarise"]

log = logging.getLogger("bench_compression")

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(model=dict(d_model=128, n_layers=4, n_heads=4, seq_len=32, n_stages=4), batch=2),
    "bench": dict(model=dict(d_model=1024, n_layers=8, n_heads=16, seq_len=512, n_stages=4), batch=32),
    "bench2048": dict(model=dict(d_model=2048, n_layers=8, n_heads=16, seq_len=512, n_stages=4), batch=32),
}
"""Model shapes: 'bench' is the standard (8 layers, d 1024, 16 heads, seq 512, 4 stages, batch 32)."""

ADAMW_LR = 3e-3
MUON_LR = 0.02
_ROUND2_LABELS = (("enc_lr", "elr", 1.0), ("dec_lr", "dlr", 1.0), ("e_init", "einit", 1.0),
                  ("d_init", "dinit", 0.0))


@dataclass(frozen=True)
class Setting:
    """One row of the grid: boundary kind/variant, ratio r, wire codec, optimizer, seeds, lrs."""

    boundary: str
    ratio: int = 128
    variant: str | None = None
    codec: str = "bf16"
    opt: str = "muon"
    seed: int = 0
    adamw_lr: float = ADAMW_LR
    muon_lr: float = MUON_LR
    token_reinject: bool = False
    tok_rank: int = 0
    """Token re-injection table rank: 0 = a full vocab x d embedding per boundary, r = vocab x r then r x d."""
    tag: str = ""
    enc_lr: float = 1.0
    """Round 2 (bench only): Muon lr multiplier of the boundary encoders' E."""
    dec_lr: float = 1.0
    """Round 2: Muon lr multiplier of the boundary decoders' D."""
    e_init: float = 1.0
    """Round 2: multiplier on E's init std (0 = E starts at zero)."""
    d_init: float = 0.0
    """Round 2: D's init std (0 = the default zero init)."""
    dec_mod: str = ""
    """Round 2: decoder-side change, one of DEC_MODS ('' = the library's decoder)."""
    ckpt: bool = False
    """Recompute every boundary (encoder + decoder) in the backward instead of keeping its activations."""

    @property
    def name(self) -> str:
        """Stable label, e.g. 'resbm@128+fp8/muon' or 'none/adamw/s1'."""
        kind = self.boundary + (f"-{self.variant}" if self.variant else "")
        base = kind if self.boundary == "none" else f"{kind}@{self.ratio}"
        base += f"+{self.codec}" if self.codec != "bf16" else ""
        base += ("+tok" + (f"{self.tok_rank}" if self.tok_rank else "")) if self.token_reinject else ""
        for field, label, default in _ROUND2_LABELS:
            if getattr(self, field) != default:
                base += f"+{label}{getattr(self, field):g}"
        base += f"+{self.dec_mod}" if self.dec_mod else ""
        base += "+ckpt" if self.ckpt else ""
        base += f"/{self.opt}" + (f"/s{self.seed}" if self.seed else "")
        return base + (f"/{self.tag}" if self.tag else "")

    def model_config(self, size: str, vocab_size: int = data.VOCAB_SIZE) -> ModelConfig:
        """The ModelConfig of this setting at a SIZES entry (and the corpus's vocabulary)."""
        # 'resbm' with no variant is pinned to the first round's `normed`, so its label keeps one
        # meaning even if the library default moves (e.g. to `postnorm`, labelled 'resbm-postnorm').
        variant = self.variant or ("normed" if self.boundary == "resbm" else None)
        # Full-rank re-injection is the library's; low rank stays the bench's own (the same as the library's
        # FactoredEmbedding: N(0, 1) table, zero projection, AdamW), so earlier result files keep one meaning.
        fields = dict(SIZES[size]["model"], vocab_size=vocab_size, boundary=self.boundary, boundary_variant=variant,
                      wire_codec=self.codec, token_reinject=self.token_reinject and not self.tok_rank,
                      token_reinject_rank=0)  # '+tok' is the full table; '+tokR' is the bench's own factored one
        fields["bottleneck_dim"] = max(1, fields["d_model"] // self.ratio)
        return ModelConfig(**fields)


def default_grid(adamw_lr: float = ADAMW_LR, muon_lr: float = MUON_LR,
                 muon_adamw_lr: float = ADAMW_LR) -> list[Setting]:
    """The issue's grid, each setting under AdamW and Muon, plus a second seed of each baseline.
    ResBM rows use the library default (postnorm + token re-injection, labelled 'resbm-postnorm@r+tok');
    'none+tok' and 'naive@128+tok' are the same re-injection without compression / identity path, and
    'resbm@128' is the first round's default (normed, no re-injection).
    `adamw_lr` is the lr of AdamW-only runs; `muon_adamw_lr` that of embeddings/head/norms under Muon."""
    rows: list[Setting] = []
    for opt in ("muon", "adamw"):
        kw = dict(opt=opt, adamw_lr=adamw_lr if opt == "adamw" else muon_adamw_lr, muon_lr=muon_lr)
        pn = dict(kw, variant="postnorm", token_reinject=True)
        rows += [Setting("none", **kw), Setting("none", seed=1, **kw), Setting("none", token_reinject=True, **kw)]
        rows += [Setting("resbm", r, **pn) for r in (32, 64, 128)]
        rows += [Setting("resbm", 128, codec="fp8", **pn), Setting("resbm", 128, codec="int8", **pn),
                 Setting("resbm", 64, codec="fp8", **pn)]  # k = 2x wider at the bytes of 128x bf16
        rows += [Setting("resbm-iota", 128, **kw), Setting("naive", 128, **kw),
                 Setting("naive", 128, token_reinject=True, **kw), Setting("resbm", 128, **kw)]
    return rows


def lr_sweep_grid(adamw_lrs: list[float], muon_lrs: list[float]) -> list[Setting]:
    """Baseline (boundary none) at each AdamW lr and each Muon lr, for tuning the baseline first."""
    rows = [Setting("none", opt="adamw", adamw_lr=lr, tag=f"lr{lr:g}") for lr in adamw_lrs]
    return rows + [Setting("none", opt="muon", muon_lr=lr, tag=f"lr{lr:g}") for lr in muon_lrs]


def _forward(model: nn.Module, extra: TokenReinjection | None, tokens: torch.Tensor,
             targets: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
    """The monolithic ResBM forward (model.py), with optional low-rank token re-injection after each
    boundary and optional recomputation of the boundaries in the backward."""
    if extra is None and not ckpt:
        return model(tokens, targets)
    x = model.embed(tokens)
    reinject = tokens if model.cfg.token_reinject else None
    for i, block in enumerate(model.blocks):
        x = block(x, model.rope_cos, model.rope_sin)
        if i in model._boundary_after:
            b = model._boundary_after[i]
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(model.boundaries[b], x, reinject, use_reentrant=False)
            else:
                x = model.boundaries[b](x, reinject)
            if extra is not None:
                x = x + extra.embed[int(b)](tokens)
    return lm_loss(model.head(model.norm(x)), targets)


def _optim_config(s: Setting, steps: int) -> OptimConfig:
    return OptimConfig(kind=s.opt, muon_lr=s.muon_lr, adamw_lr=s.adamw_lr, total_steps=max(steps, 1),
                       warmup_steps=max(1, min(50, steps // 20)))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_setting(s: Setting, size: str, steps: int, dev: torch.device, batches: list[Any],
                val_set: list[Any], val_points: int = 10, amp: bool = True, compile_model: bool = False,
                vocab_size: int = data.VOCAB_SIZE) -> dict[str, Any]:
    """Train `s` for `steps` steps on `batches` (device tensors); returns the result record."""
    cfg = s.model_config(size, vocab_size)
    batch = SIZES[size]["batch"]
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(s.seed)
    model = build_model(cfg, seed=s.seed)
    apply_round2(model, s)
    model = model.to(dev)
    extra = TokenReinjection(cfg, s.tok_rank).to(dev) if s.token_reinject and s.tok_rank else None
    holder = nn.ModuleDict({"m": model, **({"x": extra} if extra is not None else {})})
    opt = build_optimizer(holder, _optim_config(s, steps))
    split_boundary_lr(opt, holder["m"], s)
    fwd = functools.partial(torch.compile(_forward) if compile_model else _forward, ckpt=s.ckpt)
    use_amp = amp and dev.type == "cuda"

    def evaluate() -> float:
        model.eval()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            losses = [fwd(model, extra, t, y) for t, y in val_set]
        model.train()
        return float(torch.stack(losses).mean())

    val_every = max(1, steps // val_points)
    val_steps, val_loss, train_loss, windows = [0], [evaluate()], [], []
    pending: list[torch.Tensor] = []
    _sync(dev)
    t_mark, steps_in_window = time.perf_counter(), 0
    for step in range(steps):
        tokens, targets = batches[step]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = fwd(model, extra, tokens, targets)
        loss.backward()
        opt.step(step)
        opt.zero_grad()
        pending.append(loss.detach())
        steps_in_window += 1
        if step == 4 or (step + 1) % val_every == 0 or step + 1 == steps:
            _sync(dev)
            now = time.perf_counter()
            if step > 4:  # the first 5 steps hold allocator/kernel warm-up: not timed
                windows.append((now - t_mark) / steps_in_window)
            train_loss += [float(v) for v in torch.stack(pending).float().cpu()]
            pending = []
            if not math.isfinite(train_loss[-1]):
                log.warning("%s: loss is %s at step %d; stopping this setting", s.name, train_loss[-1], step)
                break
            if (step + 1) % val_every == 0 or step + 1 == steps:
                val_steps.append(step + 1)
                val_loss.append(evaluate())
                log.info("%-28s step %5d  train %.4f  val %.4f", s.name, step + 1, train_loss[-1], val_loss[-1])
            _sync(dev)
            t_mark, steps_in_window = time.perf_counter(), 0
    tokens_per_step = batch * cfg.seq_len
    n_params = sum(p.numel() for p in holder.parameters())
    return {
        "name": s.name, "setting": dataclasses.asdict(s), "size": size, "d_model": cfg.d_model,
        "k": cfg.code_dim, "ratio": cfg.d_model // cfg.code_dim, "steps": len(train_loss),
        "tokens": len(train_loss) * tokens_per_step, "tokens_per_step": tokens_per_step,
        "val_steps": val_steps, "val_loss": val_loss, "final_val": val_loss[-1],
        "train_loss": train_loss, "step_ms": 1000 * statistics.median(windows) if windows else None,
        "peak_mem": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "bytes_per_token": cfg.wire_bytes_per_token(batch) if cfg.n_stages > 1 else 0.0,
        "params": n_params, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "amp": use_amp, "compile": compile_model,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_compression", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, few steps, whole grid")
    p.add_argument("--size", default="bench", choices=sorted(SIZES), help="model shape")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per setting")
    p.add_argument("--only", default=None, help="comma-separated setting names to run")
    p.add_argument("--shard", default="0/1", help="run every n-th setting starting at i: 'i/n'")
    p.add_argument("--grid", default="main", choices=["main", "lr-sweep"], help="which grid")
    p.add_argument("--adamw-lrs", default="1e-3,2e-3,4e-3", help="lr-sweep: AdamW lrs")
    p.add_argument("--muon-lrs", default="0.01,0.02,0.04", help="lr-sweep: Muon lrs")
    p.add_argument("--adamw-lr", type=float, default=ADAMW_LR, help="AdamW lr (all params under adamw; "
                   "embeddings/head/norms under muon)")
    p.add_argument("--muon-adamw-lr", type=float, default=ADAMW_LR, help="AdamW lr of the non-matrix "
                   "parameters in Muon runs")
    p.add_argument("--muon-lr", type=float, default=MUON_LR, help="Muon lr (2-D hidden matrices incl. E, D)")
    p.add_argument("--extra", default="", help="extra settings as JSON list of Setting fields")
    p.add_argument("--timing", action="store_true", help="isolated timing pass: few steps, no table")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches (fixed held-out set)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--data", default=None, help="token corpus folder (default resbm/assets; the standard "
                   "run uses data/bench from scripts/prepare_bench_corpus.py)")
    p.add_argument("--out", default=None, help="folder for one JSON per setting")
    p.add_argument("--report", nargs="*", default=None, help="merge result folders/files into the table")
    p.add_argument("--timing-from", nargs="*", default=None, help="report: isolated timing folders")
    p.add_argument("--plot", default=None, help="report: write the validation-curve PNG here")
    return p


def _select(args: argparse.Namespace) -> list[Setting]:
    if args.grid == "lr-sweep":
        grid = lr_sweep_grid([float(v) for v in args.adamw_lrs.split(",") if v],
                             [float(v) for v in args.muon_lrs.split(",") if v])
    else:
        grid = default_grid(args.adamw_lr, args.muon_lr, args.muon_adamw_lr)
    for f in json.loads(args.extra) if args.extra else []:
        lr = args.adamw_lr if f.get("opt", "muon") == "adamw" else args.muon_adamw_lr
        grid.append(Setting(**{"adamw_lr": lr, "muon_lr": args.muon_lr, **f}))
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {s.name for s in grid})
        if unknown:
            raise SystemExit(f"--only: unknown setting(s) {unknown}; known: {[s.name for s in grid]}")
        grid = [s for s in grid if s.name in wanted]
    i, n = (int(v) for v in args.shard.split("/"))
    if not 0 <= i < n:
        raise SystemExit(f"--shard must be 'i/n' with 0 <= i < n, got {args.shard!r}")
    return grid[i::n]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """CLI entry point; returns the result records (or the table rows under --report)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.report is not None:
        results = load_results(args.report)
        rows = summarise(results, load_results(args.timing_from) if args.timing_from else None)
        print(format_table(rows))
        if args.plot:
            plot_curves(results, args.plot)
        return rows
    if args.tiny:
        args.size, args.device = "tiny", "cpu"
        args.steps = min(args.steps, 6)
        args.val_batches = min(args.val_batches, 2)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       "cpu" if args.device == "auto" else args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    settings = _select(args)
    steps = min(args.steps, 100) if args.timing else args.steps
    seq, bsz = SIZES[args.size]["model"]["seq_len"], SIZES[args.size]["batch"]
    data_seeds = sorted({s.seed for s in settings})
    corpus = data.load(args.data)
    train_tokens = corpus.manifest.split_tokens("train")
    log.info("corpus %s: %d train tokens, vocab %d; this run reads %d", corpus.name, train_tokens,
             corpus.vocab_size, steps * bsz * seq)
    batches = {sd: [tuple(t.to(dev) for t in corpus.batch(sd, i, bsz, seq)) for i in range(steps)]
               for sd in data_seeds}
    val_set = [tuple(t.to(dev) for t in b) for b in corpus.validation_batches(args.val_batches, bsz, seq)]
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results = []
    for s in settings:
        t0 = time.perf_counter()
        rec = run_setting(s, args.size, steps, dev, batches[s.seed], val_set, amp=True,
                          compile_model=args.compile, val_points=1 if args.timing else 10,
                          vocab_size=corpus.vocab_size)
        rec["isolated_timing"] = args.timing
        rec["wall_s"] = time.perf_counter() - t0
        rec["corpus"] = {"dir": corpus.name, "train_tokens": train_tokens, "vocab_size": corpus.vocab_size}
        results.append(rec)
        log.info("DONE %-28s val %.4f  step %s ms  peak %s  (%.0fs)", s.name, rec["final_val"],
                 fmt(rec["step_ms"], ".1f"), fmt(rec["peak_mem"] and rec["peak_mem"] / 2**30, ".2f"),
                 rec["wall_s"])
        if out:
            fname = s.name.replace("/", "_").replace("@", "-").replace("+", "-") + f"_d{rec['d_model']}.json"
            (out / fname).write_text(json.dumps(rec))
    if not args.timing:
        print(format_table(summarise(results)))
    return results


if __name__ == "__main__":
    main()

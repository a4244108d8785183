"""Calibrate the replay audit: honest spread per stage and hop kind, every cheater kind's error, tolerances.

Trains the model briefly (trained weights, not init), then runs rounds of an honest pipeline of
`StageWorker`s in the miner's numerics (default: CUDA, bf16 autocast), records every hop as the
validator would read it from the hop log, and replays each stage's round with
`neurons.audit.replay_round` in the validator's numerics (default: CUDA bf16, the like-for-like
replay; `--cpu-rounds` adds CPU fp32 replays). Tolerances are the honest maximum x margin
(`neurons.audit_calibration`) over every round; false positives are counted on held-out halves
(fit on one half, test on the other, both ways).
Cheaters (drills/hop_cheats.py kinds) are built from the same rounds and replayed the same way.
Prints a table and writes the tolerances as a YAML run-config fragment (`audit_tolerances:`);
`--from-raw` re-derives them from a saved `--raw` file (another margin) without replaying.

    python scripts/calibrate_audit.py --tiny                       # CPU smoke run, seconds
    python scripts/calibrate_audit.py --out audit_tolerances.yaml  # standard config on a GPU
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neurons.audit import HopRecord, ReplaySettings, Tolerances, replay_round  # noqa: E402
from neurons.audit_calibration import (HopError, derive_tolerances, honest_spread, passes,  # noqa: E402
                                       separation)
from neurons.audit_tolerances import torch_dtype  # noqa: E402
from neurons.stage_worker import StageWorker  # noqa: E402
from resbm import codec, data, optim  # noqa: E402
from resbm.config import ModelConfig  # noqa: E402
from resbm.stages import build_stages, run_pipeline  # noqa: E402

__all__ = ["main"]


def _load_hop_cheats():
    """drills/hop_cheats.py alone: the drills package imports the networked miner, which a bare
    GPU host need not have (the calibration needs only torch, numpy, safetensors, pydantic, yaml)."""
    path = Path(__file__).resolve().parents[1] / "drills" / "hop_cheats.py"
    spec = importlib.util.spec_from_file_location("hop_cheats", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CHEATS, mod.Cheat


CHEATS, Cheat = _load_hop_cheats()

SIZES = {
    "tiny": dict(d_model=64, n_layers=4, n_heads=4, seq_len=32, n_stages=4, bottleneck_dim=8),
    "micro": dict(d_model=32, n_layers=2, n_heads=2, seq_len=16, n_stages=2, bottleneck_dim=4),  # tests
    "standard": dict(d_model=1024, n_layers=8, n_heads=16, seq_len=512, n_stages=4),
}
MEASURE = Tolerances(rel_err=math.inf, min_cosine=-math.inf, norm_ratio=math.inf, loss_abs=math.inf,
                     pg_rel_err=math.inf, pg_min_cosine=-math.inf)
"""Never fails on numbers: every hop is replayed and measured."""


def _pretrain(cfg: ModelConfig, ocfg: optim.OptimConfig, steps: int, batch: int, dev: torch.device,
              seed: int) -> list[dict[str, torch.Tensor]]:
    stages = [s.to(dev) for s in build_stages(cfg, seed=seed)]
    holder = torch.nn.ModuleList(stages)
    opt = optim.build_optimizer(holder, ocfg)
    for step in range(steps):
        opt.zero_grad()
        tokens, targets = data.batch(seed + 1, step, batch, cfg.seq_len)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = run_pipeline(stages, tokens.to(dev), targets.to(dev)).loss
        opt.step(step)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"pretrain step {step} loss {loss:.3f}", flush=True)
    return [{n: t.detach().float().cpu().clone() for n, t in s.state_dict().items()} for s in stages]


class _Round:
    """One round of every stage: honest records, stale claims, pseudo-gradients."""

    def __init__(self, n_stages: int):
        self.records: list[list[HopRecord]] = [[] for _ in range(n_stages)]
        self.stale_out: list[list[torch.Tensor | None]] = [[] for _ in range(n_stages)]
        self.pg: list[dict] = []
        self.stale_pg: list[dict] = []


def _run_round(cfg, ocfg, thetas, r, args, dev, dtype) -> _Round:
    """Honest pipeline of miners (and, per stage, a stale twin fed the same inputs)."""
    S, wc = cfg.n_stages, cfg.wire_codec
    mk = lambda s: StageWorker(cfg, s, S, ocfg, dev, dtype, theta=thetas[s])  # noqa: E731
    miners, stale = [mk(s) for s in range(S)], [mk(s) for s in range(S)]
    out = _Round(S)
    for h in range(args.inner_steps):
        for a in range(args.micro):
            sid = r * 100_000 + h * args.micro + a
            tokens, targets = data.batch(args.seed, sid, args.batch, cfg.seq_len)
            x, codes = tokens, []
            for s in range(S - 1):
                side = tokens if s > 0 else None
                y = codec.roundtrip(miners[s].forward(sid, x, side), wc)
                ys = stale[s].forward(sid, x, side)
                out.records[s].append(HopRecord(sid, "fwd", h, inputs=None if s == 0 else x, claimed_output=y))
                out.stale_out[s].append(codec.roundtrip(ys, wc))
                codes.append(x)
                x = y
            loss, g = miners[S - 1].forward_backward(sid, x, targets, tokens)
            _, gs = stale[S - 1].forward_backward(sid, x, targets, tokens)
            g = codec.roundtrip(g, wc)
            out.records[S - 1].append(HopRecord(sid, "fwdbwd", h, inputs=x, claimed_output=g, claimed_loss=loss))
            out.stale_out[S - 1].append(codec.roundtrip(gs, wc))
            for s in reversed(range(S - 1)):
                gi = miners[s].backward(sid, g)
                gsi = stale[s].backward(sid, g)
                gi = None if gi is None else codec.roundtrip(gi, wc)
                out.records[s].append(HopRecord(sid, "bwd", h, grad=g, claimed_output=gi))
                out.stale_out[s].append(None if gsi is None else codec.roundtrip(gsi, wc))
                g = gi
        for s in range(S):
            miners[s].inner_step(r * args.inner_steps + h)
            stale[s].discard_gradients()
    out.pg = [miners[s].pseudo_gradient(thetas[s]) for s in range(S)]
    out.stale_pg = [stale[s].pseudo_gradient(thetas[s]) for s in range(S)]
    for s in range(S):
        thetas[s] = miners[s].theta()
    return out


def _cheat_records(kind: str, records: list[HopRecord], stale_out: list, seed: int) -> list[HopRecord]:
    cheat, out = Cheat(kind, seed=seed), []
    for rec, st in zip(records, stale_out):
        claimed = rec.claimed_output
        if kind == "stale":
            claimed = st
        elif kind == "phantom":
            claimed = None
        elif claimed is not None:
            claimed = (cheat.forward_output(claimed, rec) if rec.kind == "fwd" else cheat.input_grad(claimed, rec))
        out.append(HopRecord(rec.sample_id, rec.kind, rec.inner_step, inputs=rec.inputs, grad=rec.grad,
                             claimed_output=claimed, claimed_loss=rec.claimed_loss))
    return out


def _replay(cfg, ocfg, theta, stage, records, pg, r, args, numerics) -> list[HopError]:
    dev, dtype = numerics
    settings = ReplaySettings(round_index=r, inner_steps_per_round=args.inner_steps, data_seed=args.seed,
                              batch_size=args.batch, wire_codec=cfg.wire_codec)
    factory = lambda: StageWorker(cfg, stage, cfg.n_stages, ocfg, dev, torch_dtype(dtype))  # noqa: E731
    rep = replay_round(factory, theta, records, settings, max_seconds=1e9, claimed_pseudo_grad=pg,
                       tolerances=MEASURE, stop_on_failure=False)
    errs = []
    for c in rep.hops + ([rep.pseudo_grad] if rep.pseudo_grad else []):
        if c.kind == "bwd" and stage == 0 and c.reason == "":
            continue  # stage 0 bwd uploads nothing: nothing to compare
        loss = 0.0 if c.loss_claimed is None else c.loss_claimed - c.loss_replayed
        errs.append(HopError(stage, c.kind, c.rel_err, c.cosine, c.norm_ratio, loss,
                             missing="missing claimed output" in c.reason or "claims an output" in c.reason))
    return errs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calibrate_audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, few rounds")
    p.add_argument("--size", default="standard", choices=sorted(SIZES))
    p.add_argument("--device", default="auto", help="where the miner computes: auto | cuda | cpu")
    p.add_argument("--miner-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--replay-dtype", default=None, help="dtype of the like-for-like replay (default: the miner's)")
    p.add_argument("--rounds", type=int, default=10, help="rounds; tolerances from the first half")
    p.add_argument("--inner-steps", type=int, default=8, help="H: inner steps per round")
    p.add_argument("--micro", type=int, default=4, help="samples per inner step")
    p.add_argument("--batch", type=int, default=8, help="sequences per sample")
    p.add_argument("--pretrain-steps", type=int, default=300, help="monolithic steps before the rounds")
    p.add_argument("--cheat-rounds", type=int, default=2, help="rounds replayed for every cheater kind")
    p.add_argument("--cpu-rounds", type=int, default=0, help="rounds also replayed on CPU in float32")
    p.add_argument("--margin", type=float, default=3.0,
                   help="tolerance = honest max x margin (2 gave held-out false positives on the H200)")
    p.add_argument("--from-raw", default=None, help="skip the replays: re-analyse a --raw file")
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--adamw-lr", type=float, default=3e-3)
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="start no new round after this many seconds (0 = no limit); the rest is analysed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="audit_tolerances.yaml", help="YAML fragment for the run config")
    p.add_argument("--raw", default=None, help="write every hop's errors here (JSON)")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the calibration; print the table; write the tolerances."""
    args = _parser().parse_args(argv)
    if args.from_raw:
        return analyse(json.loads(Path(args.from_raw).read_text()), args.margin, args.out)
    if args.tiny:
        args.size, args.rounds, args.inner_steps, args.micro, args.batch = "tiny", 4, 3, 2, 2
        args.pretrain_steps, args.cheat_rounds, args.device = 20, 1, args.device if args.device != "auto" else "cpu"
        args.cpu_rounds = min(args.cpu_rounds, 1)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    cfg = ModelConfig(**SIZES[args.size])
    ocfg = optim.OptimConfig(muon_lr=args.muon_lr, adamw_lr=args.adamw_lr, weight_decay=0.0, warmup_steps=0,
                             total_steps=10**6)
    mdtype = torch_dtype(args.miner_dtype)
    miner_key = f"{dev.type}/{args.miner_dtype}"
    replays = {f"{dev.type}/{args.replay_dtype or args.miner_dtype}": (str(dev), args.replay_dtype or args.miner_dtype)}
    if args.cpu_rounds and "cpu/float32" not in replays:
        replays["cpu/float32"] = ("cpu", "float32")
    t0 = time.time()
    thetas = _pretrain(cfg, ocfg, args.pretrain_steps, args.batch, dev, args.seed)
    honest: dict[str, list[list[HopError]]] = {k: [] for k in replays}  # per replay class, per round
    cheats: dict[str, list[list[HopError]]] = {k: [] for k in CHEATS if k != "honest"}
    for r in range(args.rounds):
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            print(f"time budget reached: {r} of {args.rounds} rounds", flush=True)
            break
        start = [dict(t) for t in thetas]
        rnd = _run_round(cfg, ocfg, thetas, r, args, dev, mdtype)
        for key, numerics in replays.items():
            if key == "cpu/float32" and r >= args.cpu_rounds and key != next(iter(replays)):
                continue
            errs = []
            for s in range(cfg.n_stages):
                errs += _replay(cfg, ocfg, start[s], s, rnd.records[s], rnd.pg[s], r, args, numerics)
            honest[key].append(errs)
        if r < args.cheat_rounds:
            numerics = next(iter(replays.values()))
            for kind in cheats:
                for s in range(cfg.n_stages):
                    recs = _cheat_records(kind, rnd.records[s], rnd.stale_out[s], seed=r * 10 + s)
                    pg = Cheat(kind).pseudo_gradient(rnd.stale_pg[s] if kind == "stale" else rnd.pg[s])
                    cheats[kind].append(_replay(cfg, ocfg, start[s], s, recs, pg, r, args, numerics))
        print(f"round {r} done, {time.time() - t0:.0f}s", flush=True)
    report = {"config": vars(args) | {"model": SIZES[args.size]}, "miner": miner_key}
    report["honest"] = {k: [[vars(e) for e in rr] for rr in v] for k, v in honest.items()}
    report["cheat_errors"] = {k: [[vars(e) for e in a] for a in v] for k, v in cheats.items()}
    if args.raw:
        Path(args.raw).write_text(json.dumps(report, default=float))
    print(f"measured in {time.time() - t0:.0f}s")
    return analyse(report, args.margin, args.out)


def analyse(report: dict, margin: float, out: str) -> dict:
    """Tolerances from every honest round (x margin), checked by two-way held-out halves; cheater
    separation; prints the tables and writes the YAML fragment."""
    miner_key = report["miner"]
    honest = {k: [[HopError(**e) for e in rr] for rr in v] for k, v in report["honest"].items()}
    cheats = {k: [[HopError(**e) for e in a] for a in v] for k, v in report["cheat_errors"].items()}
    entries, summary = [], {"margin": margin, "classes": {}, "cheats": {}}

    def false_positives(fit_rounds, test_rounds, key) -> tuple[int, int]:
        table = {(t.stage, t.kind): t for t in derive_tolerances(
            honest_spread(e for rr in fit_rounds for e in rr), miner_key, key, margin=margin)}
        test = [e for rr in test_rounds for e in rr if (e.stage, e.kind) in table]
        return sum(not passes(e, table[(e.stage, e.kind)]) for e in test), len(test)

    first = next(iter(honest))
    for key, rounds in honest.items():
        half = max(1, len(rounds) // 2)
        full = honest_spread(e for rr in rounds for e in rr)
        tol = derive_tolerances(full, miner_key, key, margin=margin)
        entries += tol
        table = {(t.stage, t.kind): t for t in tol}
        fp_a, n_a = false_positives(rounds[:half], rounds[half:], key)
        fp_b, n_b = false_positives(rounds[half:], rounds[:half], key)
        n = sum(len(rr) for rr in rounds)
        print(f"\nminer {miner_key} replayed as {key}: {n} honest hop replays in {len(rounds)} rounds; "
              f"tolerances = {margin:g} x honest max. Held out: fit on the first half, "
              f"{fp_a} false positives of {n_a}; fit on the second half, {fp_b} of {n_b}")
        print(f"{'stage':>5} {'kind':>10} {'n':>5} {'max rel err':>12} {'min cos':>10} {'|norm-1|':>9} "
              f"{'|dloss|':>9} {'tol rel':>9}")
        for (s, k), sp in sorted(full.items()):
            print(f"{s:>5} {k:>10} {sp.n:>5} {sp.rel_err:>12.3e} {sp.min_cosine:>10.6f} {sp.norm_dev:>9.2e} "
                  f"{sp.loss_diff:>9.2e} {table[(s, k)].rel_err:>9.3e}")
        summary["classes"][key] = {"hops": n, "held_out": [[fp_a, n_a], [fp_b, n_b]]}
        if key == first:
            spread_main, table_main = full, table
    print(f"\ncheaters (replayed as {first}): per audit, its worst hop's error / the largest honest error "
          f"of that stage and kind (target >= 5); audits caught under the written tolerances")
    print(f"{'cheat':>8} {'audits':>6} {'min sep':>9} {'caught':>7}")
    for kind, audits in cheats.items():
        seps = [separation(a, spread_main) for a in audits]
        caught = sum(any(not passes(e, table_main[(e.stage, e.kind)]) for e in a if (e.stage, e.kind) in table_main)
                     for a in audits)
        print(f"{kind:>8} {len(audits):>6} {min(seps):>9.3g} {caught:>4}/{len(audits)}")
        summary["cheats"][kind] = {"audits": len(audits), "min_separation": min(seps), "caught": caught}
    Path(out).write_text(yaml.safe_dump(
        {"audit_tolerances": [e.model_dump(exclude_none=True) for e in entries]}, sort_keys=False))
    print(f"\nwrote {len(entries)} tolerances to {out}")
    return summary


if __name__ == "__main__":
    main()

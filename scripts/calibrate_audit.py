"""Calibrate the replay audit: honest spread per stage, hop kind and inner step, every cheater kind's
error, and tolerances keyed by what they were measured on.

Trains the model briefly (trained weights, not init), then runs rounds of an honest pipeline of
`StageWorker`s in the miner's numerics (default: CUDA, bf16 autocast), records every hop as the
validator would read it from the hop log, and replays each stage's round with
`neurons.audit.replay_round` in the validator's numerics (default: CUDA bf16, the like-for-like
replay; `--cpu-rounds` adds CPU fp32 replays). Tolerances are the honest maximum x margin per
(stage, kind, inner-step range) (`neurons.audit_calibration`); false positives are counted on
held-out halves (fit on one half of the rounds, test on the other, both ways). Cheaters
(drills/hop_cheats.py kinds) are built from the same rounds and replayed the same way.
Prints tables and writes the tolerances as a YAML run-config fragment (`audit_tolerances:`), each
entry keyed by the model's config hash, both sides' numerics and GPU model, and the inner steps it
covers: a validator applies an entry only to what it was calibrated on. `--from-raw` re-derives
them from a saved `--raw` file (another margin) without replaying.

    python scripts/calibrate_audit.py --tiny                                # CPU smoke run, seconds
    python scripts/calibrate_audit.py --preset 1b --out audit_tolerances.yaml   # on the GPU
    python scripts/calibrate_audit.py --run-config run.yaml --out audit_tolerances.yaml  # the run's own
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
from neurons.audit_calibration import CalibrationKey, HopError  # noqa: E402
from neurons.audit_tolerances import device_gpu, torch_dtype  # noqa: E402
from neurons.stage_worker import StageWorker  # noqa: E402
from resbm import codec, data, optim  # noqa: E402
from resbm.config import PRESETS, ModelConfig  # noqa: E402
from resbm.stages import build_stages, run_pipeline  # noqa: E402
from scripts.calibrate_report import analyse  # noqa: E402

__all__ = ["main", "analyse"]


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
    "standard": dict(PRESETS["bench"]),
    "bench": dict(PRESETS["bench"]),
    "1b": dict(PRESETS["1b"]),  # d 2048, 20 blocks, 4 stages: the GPU subnet benchmark's model
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
    out = [{n: t.detach().float().cpu().clone() for n, t in s.state_dict().items()} for s in stages]
    del stages, holder, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


class _Workers:
    """One StageWorker per (role, stage), built once (building a 1B stage takes seconds) and loaded
    with the round's weights before each use: `load_theta` restarts the optimizer, as a fresh one."""

    def __init__(self, cfg: ModelConfig, ocfg: optim.OptimConfig):
        self.cfg, self.ocfg, self._made = cfg, ocfg, {}

    def get(self, role: str, stage: int, device: str | torch.device, dtype: torch.dtype,
            theta: dict | None = None) -> StageWorker:
        key = (role, stage, str(device), dtype)
        if key not in self._made:
            self._made[key] = StageWorker(self.cfg, stage, self.cfg.n_stages, self.ocfg, device, dtype)
        w = self._made[key]
        if theta is not None:
            w.load_theta(theta)
        return w

    def drop(self, role: str, device: torch.device) -> None:
        """Free the workers of a role (the stale twins once the cheat rounds are done)."""
        self._made = {k: w for k, w in self._made.items() if k[0] != role}
        if device.type == "cuda":
            torch.cuda.empty_cache()


class _Round:
    """One round of every stage: honest records, stale claims, pseudo-gradients."""

    def __init__(self, n_stages: int):
        self.records: list[list[HopRecord]] = [[] for _ in range(n_stages)]
        self.stale_out: list[list[torch.Tensor | None]] = [[] for _ in range(n_stages)]
        self.pg: list[dict] = []
        self.stale_pg: list[dict] = []


def _run_round(workers: _Workers, cfg, thetas, r, args, dev, dtype, stale_twins: bool) -> _Round:
    """Honest pipeline of miners (and, for cheat rounds, a stale twin per stage fed the same inputs)."""
    S, wc = cfg.n_stages, cfg.wire_codec
    miners = [workers.get("miner", s, dev, dtype, thetas[s]) for s in range(S)]
    stale = [workers.get("stale", s, dev, dtype, thetas[s]) for s in range(S)] if stale_twins else None
    out = _Round(S)
    for h in range(args.inner_steps):
        for a in range(args.micro):
            sid = r * 100_000 + h * args.micro + a
            tokens, targets = data.batch(args.seed, sid, args.batch, cfg.seq_len)
            x = tokens
            for s in range(S - 1):
                side = tokens if s > 0 else None
                y = codec.roundtrip(miners[s].forward(sid, x, side), wc)
                out.records[s].append(HopRecord(sid, "fwd", h, inputs=None if s == 0 else x, claimed_output=y))
                out.stale_out[s].append(codec.roundtrip(stale[s].forward(sid, x, side), wc) if stale else None)
                x = y
            loss, g = miners[S - 1].forward_backward(sid, x, targets, tokens)
            g = codec.roundtrip(g, wc)
            out.records[S - 1].append(HopRecord(sid, "fwdbwd", h, inputs=x, claimed_output=g, claimed_loss=loss))
            out.stale_out[S - 1].append(codec.roundtrip(stale[S - 1].forward_backward(sid, x, targets, tokens)[1], wc)
                                        if stale else None)
            for s in reversed(range(S - 1)):
                gi = miners[s].backward(sid, g)
                gsi = stale[s].backward(sid, g) if stale else None
                gi = None if gi is None else codec.roundtrip(gi, wc)
                out.records[s].append(HopRecord(sid, "bwd", h, grad=g, claimed_output=gi))
                out.stale_out[s].append(None if gsi is None else codec.roundtrip(gsi, wc))
                g = gi
        for s in range(S):
            miners[s].inner_step(r * args.inner_steps + h)
            if stale:
                stale[s].discard_gradients()
    out.pg = [miners[s].pseudo_gradient(thetas[s]) for s in range(S)]
    out.stale_pg = [stale[s].pseudo_gradient(thetas[s]) for s in range(S)] if stale else []
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


def _replay(workers: _Workers, cfg, theta, stage, records, pg, r, args, numerics) -> list[HopError]:
    dev, dtype = numerics
    settings = ReplaySettings(round_index=r, inner_steps_per_round=args.inner_steps, data_seed=args.seed,
                              batch_size=args.batch, wire_codec=cfg.wire_codec)
    replayer = workers.get("replay", stage, dev, torch_dtype(dtype))
    rep = replay_round(lambda: replayer, theta, records, settings, max_seconds=1e9, claimed_pseudo_grad=pg,
                       tolerances=MEASURE, stop_on_failure=False)
    errs = []
    for c in rep.hops + ([rep.pseudo_grad] if rep.pseudo_grad else []):
        if c.kind == "bwd" and stage == 0 and c.reason == "":
            continue  # stage 0 bwd uploads nothing: nothing to compare
        loss = 0.0 if c.loss_claimed is None else c.loss_claimed - c.loss_replayed
        errs.append(HopError(stage, c.kind, c.rel_err, c.cosine, c.norm_ratio, loss,
                             missing="missing claimed output" in c.reason or "claims an output" in c.reason,
                             step=c.inner_step))
    return errs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calibrate_audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, few rounds")
    p.add_argument("--size", "--preset", dest="size", default="standard", choices=sorted(SIZES),
                   help="model: standard = bench (d 1024), 1b (d 2048, 20 blocks, 4 stages), tiny, micro")
    p.add_argument("--run-config", default=None,
                   help="take the model, batch, A, H and learning rates from this run config YAML")
    p.add_argument("--device", default="auto", help="where the miner computes: auto | cuda | cpu")
    p.add_argument("--miner-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--replay-dtype", default=None, help="dtype of the like-for-like replay (default: the miner's)")
    p.add_argument("--rounds", type=int, default=10, help="rounds (held-out check: fit on one half, test the other)")
    p.add_argument("--inner-steps", type=int, default=8, help="H: inner steps per round (tolerances cover steps < H)")
    p.add_argument("--micro", type=int, default=4, help="A: samples per inner step")
    p.add_argument("--batch", type=int, default=8, help="sequences per sample")
    p.add_argument("--pretrain-steps", type=int, default=300, help="monolithic steps before the rounds")
    p.add_argument("--cheat-rounds", type=int, default=2, help="rounds replayed for every cheater kind")
    p.add_argument("--cpu-rounds", type=int, default=0, help="rounds also replayed on CPU in float32")
    p.add_argument("--margin", type=float, default=5.0,
                   help="tolerance = honest max x margin (2 gave held-out false positives on the H200, 3 at 1b on an H100)")
    p.add_argument("--from-raw", default=None, help="skip the replays: re-analyse a --raw file")
    p.add_argument("--gpu", default=None, help="with --from-raw: the GPU model an older raw file (which does "
                   "not record it) was measured on, e.g. 'NVIDIA H200'")
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--adamw-lr", type=float, default=3e-3)
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="start no new round after this many seconds (0 = no limit); the rest is analysed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="audit_tolerances.yaml", help="YAML fragment for the run config")
    p.add_argument("--raw", default=None, help="write every hop's errors here (JSON)")
    return p


def _from_run_config(args: argparse.Namespace) -> dict:
    from protocol.run_config import RunConfig
    run = RunConfig.model_validate(yaml.safe_load(Path(args.run_config).read_text()))
    args.batch, args.micro, args.inner_steps = run.batch_size, run.micro_batches_per_step, run.inner_steps_per_round
    args.muon_lr, args.adamw_lr = run.muon_lr, run.adamw_lr
    return dict(run.model)


def main(argv: list[str] | None = None) -> dict:
    """Run the calibration; print the tables; write the tolerances."""
    args = _parser().parse_args(argv)
    if args.from_raw:
        return analyse(json.loads(Path(args.from_raw).read_text()), args.margin, args.out, gpu=args.gpu)
    if args.tiny:
        args.size, args.rounds, args.inner_steps, args.micro, args.batch = "tiny", 4, 3, 2, 2
        args.pretrain_steps, args.cheat_rounds, args.device = 20, 1, args.device if args.device != "auto" else "cpu"
        args.cpu_rounds = min(args.cpu_rounds, 1)
    model = _from_run_config(args) if args.run_config else SIZES[args.size]
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    cfg = ModelConfig.from_dict(model)
    ocfg = optim.OptimConfig(muon_lr=args.muon_lr, adamw_lr=args.adamw_lr, weight_decay=0.0, warmup_steps=0,
                             total_steps=10**6)
    mdtype = torch_dtype(args.miner_dtype)
    gpu = device_gpu(dev)
    like = f"{dev.type}/{args.replay_dtype or args.miner_dtype}"
    replays = {like: (str(dev), args.replay_dtype or args.miner_dtype)}
    if args.cpu_rounds and "cpu/float32" not in replays:
        replays["cpu/float32"] = ("cpu", "float32")
    keys = {k: CalibrationKey(miner=f"{dev.type}/{args.miner_dtype}", replay=k, model=cfg.config_hash(),
                              miner_gpu=gpu, replay_gpu=gpu if k.startswith(dev.type) else "") for k in replays}
    print(f"model {cfg.config_hash()} (d {cfg.d_model}, {cfg.n_layers} blocks, {cfg.n_stages} stages), miner "
          f"{dev.type}/{args.miner_dtype}{' on ' + gpu if gpu else ''}, H {args.inner_steps}, A {args.micro}, "
          f"batch {args.batch} x {cfg.seq_len}", flush=True)
    t0 = time.time()
    thetas = _pretrain(cfg, ocfg, args.pretrain_steps, args.batch, dev, args.seed)
    workers = _Workers(cfg, ocfg)
    honest: dict[str, list[list[HopError]]] = {k: [] for k in replays}  # per replay class, per round
    cheats: dict[str, list[list[HopError]]] = {k: [] for k in CHEATS if k != "honest"}
    for r in range(args.rounds):
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            print(f"time budget reached: {r} of {args.rounds} rounds", flush=True)
            break
        start = [dict(t) for t in thetas]
        rnd = _run_round(workers, cfg, thetas, r, args, dev, mdtype, stale_twins=r < args.cheat_rounds)
        for key, numerics in replays.items():
            if key == "cpu/float32" and r >= args.cpu_rounds and key != like:
                continue
            honest[key].append([e for s in range(cfg.n_stages)
                                for e in _replay(workers, cfg, start[s], s, rnd.records[s], rnd.pg[s], r, args, numerics)])
        if r < args.cheat_rounds:
            for kind in cheats:
                for s in range(cfg.n_stages):
                    recs = _cheat_records(kind, rnd.records[s], rnd.stale_out[s], seed=r * 10 + s)
                    pg = Cheat(kind).pseudo_gradient(rnd.stale_pg[s] if kind == "stale" else rnd.pg[s])
                    cheats[kind].append(_replay(workers, cfg, start[s], s, recs, pg, r, args, replays[like]))
            if r + 1 == args.cheat_rounds:
                workers.drop("stale", dev)
        print(f"round {r} done, {time.time() - t0:.0f}s, {sum(map(len, honest[like]))} honest replays", flush=True)
    report = {"config": vars(args) | {"model": model}, "miner": f"{dev.type}/{args.miner_dtype}",
              "keys": {k: vars(v) for k, v in keys.items()}}
    report["honest"] = {k: [[vars(e) for e in rr] for rr in v] for k, v in honest.items()}
    report["cheat_errors"] = {k: [[vars(e) for e in a] for a in v] for k, v in cheats.items()}
    if args.raw:
        Path(args.raw).write_text(json.dumps(report, default=float))
    print(f"measured in {time.time() - t0:.0f}s")
    return analyse(report, args.margin, args.out)


if __name__ == "__main__":
    main()

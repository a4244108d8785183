"""Loss of the compressed, sharded replica sync vs uncompressed fp32 DiLoCo (GPU; --tiny on CPU).

R replicas of the whole model are simulated in one process. Every round each replica loads the
shared weights, takes H inner steps (Muon) on its own batches, and sends its pseudo-gradient
through the variant's wire: blockwise quantization (resbm.sync_codec), or top-k sparsification
with error feedback. The pseudo-gradients are merged with the run's robust rule applied per
shard (lower-median clip reference per shard, trimmed mean at R >= 3), the merged update goes
through the merged-update codec, and the outer Nesterov step is applied. Every variant reads
the same number of tokens; two fp32 runs with different seeds give the seed noise.

    python3 scripts/bench_sync_loss.py --steps 120 --out runs/sync_loss.json
    python3 scripts/bench_sync_loss.py --tiny
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resbm import data  # noqa: E402
from resbm.config import ModelConfig  # noqa: E402
from resbm.model import build_model  # noqa: E402
from resbm.optim import OptimConfig, build_optimizer  # noqa: E402
from resbm.sync_codec import Codec, roundtrip  # noqa: E402

__all__ = ["Variant", "VARIANTS", "load_flat", "robust_merge_sharded", "sparse_ef", "run_variant", "main"]

log = logging.getLogger("bench_sync_loss")


@dataclass(frozen=True)
class Variant:
    """One wire: pseudo-gradient codec, merged-update codec, shards, sparse fraction, seed, merge."""

    name: str
    pg: str = "fp32"
    merged: str = "fp32"
    shards: int = 1
    sparse: float = 0.0
    seed: int = 0
    merge: str = "robust"


VARIANTS = [
    Variant("fp32 DiLoCo seed0"),
    Variant("int4/int8 S64", "int4", "int8", 64),
    Variant("fp32 DiLoCo seed1", seed=1),
    Variant("int8/int8 S64", "int8", "int8", 64),
    Variant("int2/int4 S64", "int2", "int4", 64),
    Variant("top3%+EF robust", "fp32", "int8", 64, sparse=0.03),
    Variant("top3%+EF mean", "fp32", "int8", 64, sparse=0.03, merge="mean"),
]

CLIP, TRIM, FLOOR = 2.0, 0.25, 0.5


def robust_merge_sharded(pgs: torch.Tensor, shards: int, prev_ref: torch.Tensor | None,
                         merge: str = "robust") -> tuple[torch.Tensor, torch.Tensor]:
    """[R, N] pseudo-gradients -> (merged [N], per-shard ref [S]) by the run's rule per shard."""
    r, n = pgs.shape
    per = math.ceil(n / shards)
    x = torch.nn.functional.pad(pgs, (0, per * shards - n)).view(r, shards, per)
    if merge == "mean":
        return x.mean(0).reshape(-1)[:n], torch.zeros(shards, device=pgs.device)
    norms = x.double().pow(2).sum(-1).sqrt().float()  # [R, S]
    ref = norms.sort(0).values[(r - 1) // 2]
    if prev_ref is not None:
        ref = torch.maximum(ref, FLOOR * prev_ref)
    bound = (CLIP if r >= 3 else 1.0) * ref
    scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
    x = x * scale[..., None]
    if r >= 3:
        trim = min(max(1, int(r * TRIM)), (r - 1) // 2)
        merged = x.sort(0).values[trim:r - trim].mean(0)
    else:
        merged = x.mean(0)
    return merged.reshape(-1)[:n], ref


def sparse_ef(pg: torch.Tensor, err: torch.Tensor, frac: float, chunk: int = 4096) -> torch.Tensor:
    """Top-k per chunk of (pg + err) with int8 values; updates err in place; returns what is sent."""
    acc = pg + err
    n = acc.numel()
    pad = (-n) % chunk
    a = torch.nn.functional.pad(acc, (0, pad)).view(-1, chunk)
    k = max(1, int(chunk * frac))
    idx = a.abs().topk(k, dim=1).indices
    vals = roundtrip(a.gather(1, idx), Codec("int8", 8 * math.ceil(k / 8)) if k >= 8 else Codec("fp32", 8))
    sent = torch.zeros_like(a).scatter_(1, idx, vals).reshape(-1)[:n]
    err.copy_(acc - sent)
    return sent


def load_flat(model: torch.nn.Module, theta: torch.Tensor) -> None:
    """Copy flat `theta` into the model's parameters (copies: training must not touch theta)."""
    off = 0
    with torch.no_grad():
        for prm in model.parameters():
            k = prm.numel()
            prm.copy_(theta[off:off + k].view_as(prm))
            off += k


def wire_bits_per_value(v: Variant, block: int = 256) -> float:
    """Bits per parameter a replica uploads for its pseudo-gradient."""
    if v.sparse:
        return v.sparse * (8 + 12) + 32 / 4096
    c = Codec(v.pg, block)
    return c.bits + (0 if v.pg == "fp32" else 32 / block)


def run_variant(v: Variant, cfg: ModelConfig, corpus, val, r: int, h: int, steps: int, batch: int,
                dev: torch.device, outer_lr: float, outer_mom: float) -> dict:
    """Train one variant; returns its record (val loss curve, wall time)."""
    t0 = time.perf_counter()
    models = [build_model(cfg, seed=v.seed).to(dev) for _ in range(r)]
    ocfg = OptimConfig(kind="muon", muon_lr=0.02, adamw_lr=3e-3, weight_decay=0.0,
                       warmup_steps=max(1, min(50, steps // 20)), total_steps=steps)
    opts = [build_optimizer(m, ocfg) for m in models]
    theta = parameters_to_vector(models[0].parameters()).detach().float().clone()
    mom = torch.zeros_like(theta)
    errs = [torch.zeros_like(theta) for _ in range(r)] if v.sparse else None
    ref = None
    amp = dev.type == "cuda"
    pgc, mc = Codec(v.pg, 256), Codec(v.merged, 256)
    curve = []

    def evaluate() -> float:
        load_flat(models[0], theta)
        models[0].eval()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = float(torch.stack([models[0](t, y) for t, y in val]).mean())
        models[0].train()
        return out

    rounds = steps // h
    for rnd in range(rounds):
        pgs = []
        for i, (m, opt) in enumerate(zip(models, opts)):
            load_flat(m, theta)
            for j in range(h):
                step = rnd * h + j
                t, y = (x.to(dev, non_blocking=True) for x in
                        corpus.batch(1000 * v.seed + 17, (step * r + i), batch, cfg.seq_len))
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    loss = m(t, y)
                loss.backward()
                opt.step(step)
                opt.zero_grad()
            pg = theta - parameters_to_vector(m.parameters()).detach().float()
            pgs.append(sparse_ef(pg, errs[i], v.sparse) if v.sparse else roundtrip(pg, pgc))
        merged, ref = robust_merge_sharded(torch.stack(pgs), v.shards, ref, v.merge)
        merged = roundtrip(merged, mc)
        mom = outer_mom * mom + merged
        theta = theta - outer_lr * (merged + outer_mom * mom)
        if rnd == rounds - 1 or (rnd + 1) % max(1, rounds // 4) == 0:
            curve.append(((rnd + 1) * h, evaluate()))
            log.info("%-22s step %4d  val %.4f  (%.0fs)", v.name, curve[-1][0], curve[-1][1],
                     time.perf_counter() - t0)
    return {**asdict(v), "curve": curve, "final_val": curve[-1][1], "wall_s": time.perf_counter() - t0,
            "bits_per_param_up": wire_bits_per_value(v),
            "tokens": rounds * h * r * batch * cfg.seq_len}


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI: run the variants, print the table, write JSON."""
    p = argparse.ArgumentParser(prog="bench_sync_loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="inner steps per replica (multiple of H; "
                   "default 120, 8 with --tiny)")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--inner", type=int, default=4, help="H (the localnet's)")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.5, help="the localnet's")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip variants once this much time passed")
    p.add_argument("--only", default="", help="comma-separated variant indices")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    cfg = ModelConfig.preset("tiny" if a.tiny else "bench")
    batch = 2 if a.tiny else 32
    steps = a.steps or (8 if a.tiny else 120)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    corpus = data.load(None)
    val = [tuple(x.to(dev) for x in b) for b in corpus.validation_batches(2 if a.tiny else 8, batch, cfg.seq_len)]
    chosen = [VARIANTS[int(i)] for i in a.only.split(",")] if a.only else VARIANTS
    t0, out = time.perf_counter(), []
    for v in chosen:
        if time.perf_counter() - t0 > a.budget_s:
            log.warning("budget spent: skipping %s", v.name)
            continue
        out.append(run_variant(v, cfg, corpus, val, a.replicas, a.inner, steps, batch, dev,
                               a.outer_lr, a.outer_momentum))
        if a.out:
            Path(a.out).write_text(json.dumps({"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
                                               "torch": torch.__version__, "results": out}, indent=1))
    base = next((x["final_val"] for x in out if x["name"] == "fp32 DiLoCo seed0"), None)
    noise = [x["final_val"] for x in out if x["name"].startswith("fp32 DiLoCo")]
    print(f"\nR={a.replicas} H={a.inner} steps={steps} batch={batch} model={'tiny' if a.tiny else 'bench'} "
          f"outer lr {a.outer_lr} mom {a.outer_momentum}; seed noise |s0-s1| = "
          f"{abs(noise[0] - noise[1]) / noise[0] * 100 if len(noise) == 2 else float('nan'):.2f}%")
    print(f"{'variant':24} {'bits/param up':>13} {'final val':>10} {'vs fp32 s0':>10}")
    for x in out:
        rel = (x["final_val"] / base - 1) * 100 if base else float("nan")
        print(f"{x['name']:24} {x['bits_per_param_up']:13.3f} {x['final_val']:10.4f} {rel:+9.2f}%")
    return out


if __name__ == "__main__":
    main()

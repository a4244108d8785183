"""The whole subnet on one GPU host against the single-process reference trainer on the same GPU.

    python scripts/bench_gpu_subnet.py --audit-tolerances audit_tolerances.yaml     # 1B, the defaults
    python scripts/bench_gpu_subnet.py --preset tiny --device cpu --dtype float32 --rounds 3 \
        --inner-steps 4 --micro-batches-per-step 4 --max-open-graphs 2 --reference-steps 8 \
        --reference-batch 0 --reference-accum 0 --seconds 150  # smoke

Runs the reference trainer first (resbm.train on the same model, inner steps and outer step, at its
measured configuration: 128K tokens a step, batch 16 x accum 8, compiled on CUDA; its tokens/s
leave out the warm-up steps), then S3 (rclone), LocalChain, the bridge, the miners and a validator as separate
processes (scripts/localnet_cluster), and prints: tokens/s of both, per-miner compute fraction and
MFU, where each miner's wall time went (docs/BENCHMARKS.md), each round's sync share, audits with
their replay seconds, and the validator's lag. The defaults are the 1B configuration of
docs/BENCHMARKS.md: the run config's own sync defaults (sharded, int4 / int8), A 32 samples per inner
step with at most 4 forward graphs per miner, H 12, and more rounds than fit in `--seconds`, so the
window is steady-state training with its merges.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from scripts.gpu_placement import NCCL_ENV, PlacementError, check_visible, plan, validator_gpu
from scripts.gpu_subnet_metrics import (BREAKDOWN_COLUMNS, audit_counts, merge_seconds_per_round, mfu, round_shares,
                                        seal_seconds, stage_flops_per_token, time_breakdown, validator_lag)

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Every option of the benchmark."""
    p = argparse.ArgumentParser(prog="bench_gpu_subnet", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", default="1b", help="model preset (resbm.config.PRESETS)")
    a("--d-model", type=int, default=0, help="override the preset's width (0 = keep)")
    a("--layers", type=int, default=0, help="override the preset's blocks (0 = keep)")
    a("--seq-len", type=int, default=0, help="override the preset's sequence length (0 = keep)")
    a("--miners-per-stage", type=int, default=1, help="replicas per stage")
    a("--rounds", type=int, default=50, help="rounds of the run (the window ends at --seconds)")
    a("--inner-steps", type=int, default=12, help="H: inner steps per round")
    a("--micro-batches-per-step", type=int, default=32, help="A: samples per inner step per replica")
    a("--batch-size", type=int, default=8, help="sequences per sample")
    a("--max-open-graphs", type=int, default=4, help="forward graphs a miner holds at most (its GPU memory; "
      "0 = as many as A)")
    a("--threads-per-miner", type=int, default=0, help="torch CPU threads per miner (0 = the CPUs shared out)")
    a("--gpus", type=int, default=0, help="spread the miners over this many GPUs (scripts/gpu_placement.py: "
      "contiguous stage groups, or one pipeline per GPU with --miners-per-stage = GPUs; 0 = all on the default GPU)")
    a("--device", default="cuda", help="miners', validator's and reference's device")
    a("--dtype", default="bfloat16", help="compute dtype (bfloat16 = autocast on cuda)")
    a("--sync", default="", help="sync mode (sharded | state); empty = the run config's default")
    a("--sync-codec", default="", help="pseudo-gradient codec (fp32 | int8 | int4 | int2); empty = the default")
    a("--sync-merged-codec", default="", help="merged-update codec; empty = the run config's default")
    a("--checkpoint-every", type=int, default=0, help="K (0 = the run config's default)")
    a("--max-memory", default="share", help="each miner's --max-memory (kept activations); 'share': half "
      "of a GPU's memory split evenly between the miners on it")
    a("--audit-fraction", type=float, default=0.05, help="share of miners the validator audits per round "
      "(at least one is audited every round)")
    a("--audit-tolerances", default="", help="YAML with an audit_tolerances list (calibrate_audit.py output)")
    a("--reference-steps", type=int, default=10, help="reference trainer steps (0 = the subnet's, rounds x H)")
    a("--reference-batch", type=int, default=16, help="reference sequences per micro-batch (0 = --batch-size)")
    a("--reference-accum", type=int, default=8, help="reference micro-batches per step (0 = A x replicas); "
      "16 x 8 x 1024 = 128K tokens a step, the efficient trainer's measured configuration")
    a("--reference-compile", action=argparse.BooleanOptionalAction, default=True,
      help="torch.compile the reference's blocks (on CUDA only; its first steps, the compile, are left out)")
    a("--seconds", type=float, default=300.0, help="stop the subnet after this long and report what it did")
    a("--catch-up-seconds", type=float, default=45.0, help="after training, wait this long for the validator")
    a("--workdir", default="gpu-subnet-out", help="data, logs and wallets")
    a("--out", default="", help="write the result JSON here too")
    return p


def _model(args):
    from resbm.config import PRESETS, ModelConfig
    over = {k: v for k, v in (("d_model", args.d_model), ("n_layers", args.layers), ("seq_len", args.seq_len)) if v}
    if args.preset not in PRESETS:
        raise SystemExit(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.preset(args.preset, **over)


def _run_config(args, cfg) -> dict:
    from scripts.localnet import build_parser as localnet_parser, run_config_from_args
    ns = localnet_parser().parse_args([])
    ns.stages, ns.miners_per_stage, ns.rounds = cfg.n_stages, args.miners_per_stage, args.rounds
    ns.inner_steps, ns.micro_batches_per_step, ns.batch_size = args.inner_steps, args.micro_batches_per_step, args.batch_size
    ns.lease_seconds = 60.0
    rc = run_config_from_args(ns)
    rc["model"] = cfg.to_dict()
    rc.update(max_state_bytes=1 << 36, max_object_bytes=1 << 28, merge_timeout_seconds=300.0,
              incentives={"audit_fraction": args.audit_fraction})
    for key in ("sync_mode", "sync_codec", "sync_merged_codec", "checkpoint_every", "sync_shards"):
        rc.pop(key, None)  # the localnet's choices: the benchmark measures the run config's defaults
    given = {"sync_mode": args.sync, "sync_codec": args.sync_codec, "sync_merged_codec": args.sync_merged_codec,
             "checkpoint_every": args.checkpoint_every}
    rc.update({k: v for k, v in given.items() if v})
    if args.audit_tolerances:
        rc["audit_tolerances"] = yaml.safe_load(Path(args.audit_tolerances).read_text())["audit_tolerances"]
    return rc


def reference(args, cfg, rc) -> dict:
    """Tokens/s and MFU of the single-process trainer on the same device, model and schedule."""
    import torch
    from resbm.optim import OptimConfig
    from resbm.train import train
    steps = args.reference_steps or args.rounds * args.inner_steps
    batch = args.reference_batch or args.batch_size
    accum = args.reference_accum or args.micro_batches_per_step * args.miners_per_stage
    compiled = args.reference_compile and args.device.startswith("cuda")
    ocfg = OptimConfig(muon_lr=rc["muon_lr"], adamw_lr=rc["adamw_lr"], weight_decay=0.0,
                       warmup_steps=rc["warmup_steps"], total_steps=steps, min_lr_ratio=rc["min_lr_ratio"])
    hist = train(cfg, ocfg, steps, batch_size=batch, accum=accum, device=args.device, amp=args.dtype == "bfloat16",
                 outer_every=args.inner_steps, outer_lr=rc["outer_lr"], outer_momentum=rc["outer_momentum"],
                 progress=False, compile=compiled, timing_warmup=min(2, steps - 1))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    steady = hist.get("steady_tokens_per_s")  # the steps after the warm-up (and the compile)
    return {"steps": steps, "batch": batch, "accum": accum, "compile": compiled,
            "tokens_per_step": batch * accum * cfg.seq_len, "tokens_per_s": steady or hist["tokens_per_s"],
            "mfu": hist.get("steady_mfu") if steady else hist["mfu"], "all_steps_tokens_per_s": hist["tokens_per_s"],
            "last_loss": hist["loss"][-1]}


class _Gpu:
    """GPU busy share sampled through NVML (None where NVML or a GPU is missing)."""

    def __init__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:
            self.nvml, self.handles = None, []
        self.samples: list[float] = []

    def sample(self) -> None:
        """Record the current utilisation, the mean over the GPUs."""
        if self.handles:
            rates = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100 for h in self.handles]
            self.samples.append(sum(rates) / len(rates))

    def busy(self) -> float | None:
        """Mean utilisation over the samples."""
        return sum(self.samples) / len(self.samples) if self.samples else None


def subnet(args, cfg, rc) -> dict:
    """Run the subnet until its rounds are done or `--seconds` pass; return what it measured."""
    from protocol.bridge_client import BridgeClient
    from protocol.client import BridgeError
    from scripts.localnet_cluster import Cluster
    from scripts.localnet_workdir import prepare_workdir
    threads = args.threads_per_miner or max(1, (os.cpu_count() or 2) // (cfg.n_stages * args.miners_per_stage + 3))
    per_gpu = max(1, rc["n_stages"] * args.miners_per_stage // max(1, args.gpus))
    budget = f"{0.5 / per_gpu:.4f}" if args.max_memory == "share" else args.max_memory
    cluster = Cluster(prepare_workdir(args.workdir), rc, args.miners_per_stage, device=args.device,
                      miner_args=["--dtype", args.dtype, "--status-every", "3", "--max-memory", budget,
                                  "--max-open-graphs", str(args.max_open_graphs)],
                      gpus=args.gpus, threads_per_miner=threads)
    phases: list[tuple[float, int, str]] = []
    lags: list[int] = []
    gpu = _Gpu()
    t_first = t_end = None
    completed, m = 0, None
    try:
        cluster.start()
        client = BridgeClient(cluster.owner_keypair, cluster.bridge_url, None)
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            try:
                m = client.metrics()
            except (BridgeError, OSError):
                time.sleep(0.5)
                continue
            now = time.monotonic()
            phases.append((now, m.round, m.phase))
            gpu.sample()
            if t_first is None and sum(st.hops_done for st in m.stages) > 0:
                t_first = now
            completed = m.completed_total
            lags.append(validator_lag(m.round, m.phase, _validator_next(cluster)))
            if m.phase == "done":
                break
            time.sleep(0.5)
        t_end = time.monotonic()
        print(f"[subnet] training stopped after {t_end - t0:.0f}s in phase {m.phase if m else '?'}; "
              f"{completed} samples", flush=True)
        end = time.monotonic() + args.catch_up_seconds
        while m is not None and time.monotonic() < end:
            lag = validator_lag(m.round, m.phase, _validator_next(cluster))
            if lag == 0:
                break
            time.sleep(1.0)
        final_lag = validator_lag(m.round, m.phase, _validator_next(cluster)) if m is not None else None
        seals = _bridge_seals(cluster)
    finally:
        cluster.stop()
    status = cluster.miner_status()
    vlog = (cluster.workdir / "logs" / "validator0.log")
    window = (t_end - t_first) if (t_first and t_end) else 0.0
    gpus = {n.name: n.env.get("CUDA_VISIBLE_DEVICES", "default") for n in cluster.miners}
    return {"status": status, "gpus": gpus, "phases": phases, "seals": seals, "window_seconds": window, "samples": completed,
            "rounds_done": (m.round + (m.phase == "done")) if m else 0, "phase": m.phase if m else None,
            "lag_max": max(lags) if lags else None, "lag_final": final_lag, "gpu_busy": gpu.busy(),
            "audits": audit_counts(vlog.read_text(errors="replace") if vlog.exists() else ""),
            "sync_devices": _sync_devices(cluster)}


def _sync_devices(cluster) -> dict[str, str]:
    """Where each process's sharded sync ran, from its log (neurons/sync_device.py's line)."""
    import re
    out = {}
    for n in cluster.miners + cluster.validator_procs:
        p = cluster.workdir / "logs" / f"{n.name}.log"
        text = p.read_text(errors="replace") if p.exists() else ""
        m = re.search(r"the sharded sync runs on (\S+)|the sharded sync on \S+ does not reproduce", text)
        out[n.name] = (m.group(1) or "cpu (fallback)") if m else "cpu"
    return out


def _bridge_seals(cluster) -> dict[int, tuple[float, int]]:
    """Seal seconds per stage from the bridge's Prometheus text ({} if it does not answer)."""
    import httpx
    from protocol.routes import route
    try:
        return seal_seconds(httpx.get(cluster.bridge_url + route("prometheus").path, timeout=10).text)
    except httpx.HTTPError:
        return {}


def _validator_next(cluster) -> int:
    try:
        return json.loads((cluster.workdir / "validator0.state.json").read_text()).get("next_round", 0)
    except (OSError, ValueError):
        return 0


def summarize(args, cfg, ref: dict, net: dict, peak: float | None, rc: dict | None = None) -> dict:
    """Every figure of the table, as one JSON-able dict (`rc`: the run config, for its sync settings)."""
    from protocol.run_config import RunConfig
    run = RunConfig(**rc) if rc else None
    sync_settings = "n/a" if run is None else (
        f"{run.sync_mode} {run.sync_codec}/{run.sync_merged_codec}, {run.sync_shards} shards, "
        f"checkpoint every {run.checkpoint_every}, A {run.micro_batches_per_step}, H {run.inner_steps_per_round}, "
        f"batch {run.batch_size}, audit fraction {run.incentives.audit_fraction}")
    tokens_per_sample = args.batch_size * cfg.seq_len
    tps = net["samples"] * tokens_per_sample / net["window_seconds"] if net["window_seconds"] else 0.0
    miners = []
    for name, s in sorted(net["status"].items()):
        stage = s.get("stage", -1)
        tokens = s.get("tokens_per_s", 0.0) * s.get("wall_seconds", 0.0)
        fpt = stage_flops_per_token(cfg, stage) if stage >= 0 else 0.0
        miners.append({"miner": name, "stage": stage, "time": time_breakdown(s, net["seals"].get(stage)), "gpu": net["gpus"].get(name), "compute_fraction": s.get("active_compute_fraction", 0.0),
                       "active_s": s.get("active_seconds", 0.0), "compute_s": s.get("compute_seconds", 0.0),
                       "mfu_active": mfu(fpt, tokens, s.get("active_seconds", 0.0), peak),
                       "mfu_compute": mfu(fpt, tokens, s.get("compute_seconds", 0.0), peak)})
    merges = merge_seconds_per_round(net["phases"])
    shares = round_shares(net["phases"])
    return {"model": {"preset": args.preset, "d_model": cfg.d_model, "layers": cfg.n_layers, "stages": cfg.n_stages,
                      "matmul_params": cfg.matmul_params(), "seq_len": cfg.seq_len, "boundary": cfg.boundary},
            "device": args.device, "dtype": args.dtype, "reference": ref, "subnet_tokens_per_s": tps,
            "gpus": max(1, args.gpus),
            "ratio_vs_reference": tps / max(1, args.gpus) / ref["tokens_per_s"] if ref.get("tokens_per_s") else None,
            "window_seconds": net["window_seconds"], "samples": net["samples"], "rounds_done": net["rounds_done"],
            "phase": net["phase"], "gpu_busy": net["gpu_busy"], "miners": miners,
            "merge_seconds": {str(k): round(v, 2) for k, v in sorted(merges.items())},
            "rounds": {str(k): {kk: round(vv, 3) for kk, vv in v.items()} for k, v in sorted(shares.items())},
            "sync_devices": net["sync_devices"], "sync": sync_settings,
            "audits": net["audits"], "validator_lag_max": net["lag_max"], "validator_lag_final": net["lag_final"]}


def print_table(r: dict) -> None:
    """The benchmark's one table (and a few lines around it)."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    mdl = r["model"]
    print(f"\n=== GPU subnet: {mdl['preset']} ({mdl['matmul_params'] / 1e9:.2f}B matmul params, d {mdl['d_model']}, "
          f"{mdl['layers']} blocks, {mdl['stages']} stages, {mdl['boundary']}), {r['device']} {r['dtype']} ===")
    ref = r["reference"]
    print(f"{'figure':<44} value")
    print(f"{'reference trainer tokens/s (1 process)':<44} {ref['tokens_per_s']:,.0f} (MFU {pct(ref['mfu'])}; "
          f"{ref.get('tokens_per_step', 0) // 1024}K tokens/step, batch {ref.get('batch')} x accum {ref.get('accum')}"
          f"{', compiled' if ref.get('compile') else ''}, after the warm-up steps)")
    ratio = "n/a" if r["ratio_vs_reference"] is None else f"{100 * r['ratio_vs_reference']:.1f}% of reference"
    print(f"{'subnet tokens/s (first hop to last round)':<44} {r['subnet_tokens_per_s']:,.0f} on {r['gpus']} GPU(s) "
          f"(per GPU {ratio})")
    print(f"{'rounds done / samples / window':<44} {r['rounds_done']} / {r['samples']} / {r['window_seconds']:.1f}s "
          f"(phase {r['phase']})")
    print(f"{'GPU busy (NVML, mean over the window)':<44} {pct(r['gpu_busy'])}")
    for mm in r["miners"]:
        who = f"{mm['miner']} stage {mm['stage']} gpu {mm['gpu']}"
        print(f"{who + ' compute / MFU active / MFU compute':<44} "
              f"{pct(mm['compute_fraction'])} / {pct(mm['mfu_active'])} / {pct(mm['mfu_compute'])}")
    merges = " ".join(f"r{k}={v:.1f}s" for k, v in r["merge_seconds"].items()) or "none closed"
    print(f"{'merge seconds per round':<44} {merges}")
    rounds = r["rounds"]
    if rounds:
        cells = " ".join(f"r{k}={100 * v['sync_share']:.1f}%" for k, v in rounds.items())
        later = [v["sync_share"] for k, v in rounds.items() if int(k) > 0]
        mean = f" (mean after round 0: {100 * sum(later) / len(later):.1f}%)" if later else ""
        print(f"{'sync share of each closed round (<= 10%)':<44} {cells}{mean}")
    print(f"{'sync':<44} {r['sync']}; on " + ", ".join(f"{k} {v}" for k, v in r["sync_devices"].items()))
    print_breakdown(r["miners"])
    a = r["audits"]
    print(f"{'audits run / passed / failed / incomplete':<44} {a['run']} / {a['passed']} / {a['failed']} / {a['incomplete']}"
          f" ({a['seconds']:.1f}s of replay)")
    print(f"{'validator lag, rounds (max / at the end)':<44} {r['validator_lag_max']} / {r['validator_lag_final']}")


def print_breakdown(miners: list[dict]) -> None:
    """Per miner: where its wall time went (seconds; the main loop's activities sum to `wall`,
    background work overlaps them) and a hop's wall time over its compute."""
    cols = BREAKDOWN_COLUMNS
    print(f"\nwall time per miner, seconds (main loop: {' + '.join(cols[:-3])} = wall; "
          f"background, overlapping: {', '.join(cols[-3:])}; seal = the bridge's copy at done, inside report)")
    head = ["miner", "stage", "hops", "wall", *cols, "seal", "hop wall/compute", "own path/compute"]
    print(" ".join(f"{h:>9}" for h in head))
    for mm in miners:
        t = mm["time"]
        ratio = "n/a" if t["hop_wall_ratio"] is None else f"{t['hop_wall_ratio']:.2f}x"
        own = "n/a" if t["own_path_ratio"] is None else f"{t['own_path_ratio']:.2f}x"
        seal = "n/a" if t["seal"] is None else f"{t['seal']:.1f}"
        cells = [mm["miner"], str(mm["stage"]), str(t["hops"]), f"{t['wall']:.1f}",
                 *(f"{t[c]:.1f}" for c in cols), seal, ratio, own]
        print(" ".join(f"{c:>9}" for c in cells))
    print("  hop wall/compute: in-round seconds (lease, wait_work, download, compute, drain, barrier, step)"
          " per hop over compute per hop (target <= 1.3x at 1B); own path: lease + download + compute + drain.")


def main(argv=None) -> int:
    """Reference first, then the subnet; print the table."""
    import logging
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.update(NCCL_ENV)  # NVLink multicast off here and in every child (the reference's NCCL too)
    cfg = _model(args)
    rc = _run_config(args, cfg)
    from resbm.train import _peak_flops, pick_device
    dev = pick_device(args.device)
    try:
        slots = plan(cfg.n_stages, cfg.n_stages * args.miners_per_stage, args.gpus)
        if args.gpus:
            import torch
            check_visible(args.gpus, torch.cuda.device_count() if dev.type == "cuda" else 0)
    except PlacementError as exc:
        raise SystemExit(f"bench_gpu_subnet: {exc}") from None
    if args.gpus:
        print("[placement] " + ", ".join(f"miner{s.order} stage {s.stage} replica {s.replica} -> GPU {s.gpu}"
                                         for s in slots) + f"; validator -> GPU {validator_gpu(args.gpus)}", flush=True)
    peak = _peak_flops(dev) if dev.type == "cuda" else None
    print(f"[reference] {args.reference_steps or args.rounds * args.inner_steps} steps on {dev} ...", flush=True)
    ref = reference(args, cfg, rc)
    print(f"[reference] {ref['tokens_per_s']:,.0f} tok/s (MFU {ref['mfu']}, {ref['tokens_per_step']} tokens/step)",
          flush=True)
    print(f"[subnet] starting (at most {args.seconds:.0f}s) ...", flush=True)
    net = subnet(args, cfg, rc)
    result = summarize(args, cfg, ref, net, peak, rc)
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

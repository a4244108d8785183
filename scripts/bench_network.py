"""Network benchmark: one model trained single-process and through the local subnet over a slow link.

    python scripts/bench_network.py                  # (a), (b), (c) at the defaults, ~5-8 min on 2 cores
    python scripts/bench_network.py --configs c --rounds 1 --micro-batches 8   # quick look at (c)

(a) resbm.train.train in this process, 1 thread; (b) the local subnet with the `none` boundary
(uncompressed codes); (c) the local subnet with `resbm` at ratio r (k = d / r); (b) and (c) under an
emulated link (`--link-mbps`, `--link-latency-ms`, `--link-jitter-ms`, `--link-loss`). Every miner
runs with 1 thread. The link is the kernel's where this process may make network namespaces
(root): every miner in its own namespace behind a shaped link, so bridge calls pay it as well as
S3 transfers (scripts/netlab.py); else the in-process emulator, which delays object transfers only.
The run says which. Prints one table (tokens/s relative to (a), bytes per boundary, each miner's
compute fraction and where the rest of its time went), the round trips on each hop kind's path
counted from the miners' request counters, and, with --write-md, puts it into the "Network"
section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import sqlite3
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.exits import exits_cleanly
from scripts.bench_network_rtt import format_other_table, format_rtt_table, hop_round_trips, other_round_trips

__all__ = ["build_parser", "subnet_run_config", "run_single", "run_subnet", "load_hops",
           "analyse_hops", "stage_balance_text", "format_table", "write_markdown", "main"]

log = logging.getLogger("bench_network")
SECTION = "### Network: local subnet vs single process (CPU)"  # a topic under "## Current results"
KERNEL_SECTION = "### Network over kernel-emulated links (CPU, issue 24)"  # the same runs, every request shaped
REPO = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    """Every option of the benchmark."""
    p = argparse.ArgumentParser(prog="bench_network", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--configs", default="a,b,c", help="which of a (single process), b (subnet, none), c (subnet, resbm, "
      "whole-state merge), d (c with the sharded, compressed sync) to run")
    a("--miners-per-stage", type=int, default=1, help="R: replicas per stage of the subnet runs")
    a("--sync-shards", type=int, default=4, help="(d): shards per stage")
    a("--sync-codec", default="int4", help="(d): pseudo-gradient codec")
    a("--sync-merged-codec", default="int8", help="(d): merged-update codec")
    a("--checkpoint-every", type=int, default=4, help="(d): K, a full checkpoint every K rounds (and at the end)")
    a("--workdir", default="/tmp/bench-network", help="scratch directory (wiped first)")
    a("--d-model", type=int, default=512, help="model width d")
    a("--layers", type=int, default=5, help="transformer blocks")
    a("--stage-layers", default="3,2", help="blocks per stage (the last stage also holds the LM head)")
    a("--heads", type=int, default=8, help="attention heads")
    a("--seq-len", type=int, default=128, help="tokens per sequence")
    a("--batch-size", type=int, default=4, help="sequences per sample")
    a("--micro-batches", type=int, default=32, help="A: samples per inner step")
    a("--inner-steps", type=int, default=2, help="H: inner steps per round")
    a("--rounds", type=int, default=2, help="rounds (each ends with a merge)")
    a("--ratio", type=int, default=128, help="bottleneck ratio r of (c)")
    a("--codec", default="bf16", help="wire codec of (b) and (c)")
    a("--link-mode", default="auto", choices=("auto", "kernel", "process"),
      help="kernel: namespaces + shaped links (needs root; fails with one line otherwise); process: the "
           "in-process emulator (object transfers only); auto: kernel where possible")
    a("--link-mbps", type=float, default=100.0, help="emulated link bandwidth of every miner, each way")
    a("--link-latency-ms", type=float, default=50.0, help="kernel: round-trip time the link adds to every "
      "packet; process: latency added per object transfer")
    a("--link-jitter-ms", type=float, default=0.0, help="kernel: spread of that round trip (+- half of it)")
    a("--link-loss", type=float, default=0.0, help="kernel: fraction of packets lost in each direction")
    a("--seed", type=int, default=1, help="data and init seed")
    a("--timeout", type=float, default=900.0, help="give up on one subnet run after this many seconds")
    a("--json", default="", help="also write the results here")
    a("--write-md", default="", help="write the table into this markdown file's Network section")
    return p


def _model_dict(args, boundary: str) -> dict:
    from resbm.config import ModelConfig
    layers = tuple(int(x) for x in args.stage_layers.split(",")) if args.stage_layers else None
    if layers is not None and len(layers) != 2:
        raise ValueError(f"--stage-layers needs 2 entries (2 stages), got {args.stage_layers!r}")
    return ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, seq_len=args.seq_len,
                       n_stages=2, boundary=boundary, bottleneck_ratio=args.ratio if boundary != "none" else None,
                       wire_codec=args.codec, stage_layers=layers).to_dict()


def subnet_run_config(args, boundary: str, sync: str = "state") -> dict:
    """The RunConfig mapping of one subnet run: localnet's, with this benchmark's model and sync."""
    from scripts.localnet import build_parser as localnet_parser, run_config_from_args
    ns = localnet_parser().parse_args([
        "--stages", "2", "--miners-per-stage", str(args.miners_per_stage), "--rounds", str(args.rounds),
        "--batch-size", str(args.batch_size), "--micro-batches-per-step", str(args.micro_batches),
        "--inner-steps", str(args.inner_steps), "--seed", str(args.seed), "--lease-seconds", "60",
        "--sync", sync, "--sync-shards", str(args.sync_shards), "--sync-codec", args.sync_codec,
        "--sync-merged-codec", args.sync_merged_codec, "--checkpoint-every", str(args.checkpoint_every)])
    rc = run_config_from_args(ns)
    rc["model"] = _model_dict(args, boundary)
    rc["merge_timeout_seconds"] = 120.0
    return rc


def _split(args) -> tuple[int, ...]:
    """Blocks per stage of the subnet runs (even when --stage-layers is empty)."""
    if args.stage_layers:
        return tuple(int(x) for x in args.stage_layers.split(","))
    return (args.layers // 2, args.layers - args.layers // 2)


def run_single(args) -> dict:
    """(a): resbm.train.train on the same model, samples and batch shape, on one thread."""
    import torch
    from resbm.config import ModelConfig
    from resbm.optim import OptimConfig
    from resbm.train import train
    rc = subnet_run_config(args, "none")
    cfg = ModelConfig.from_dict(rc["model"])
    steps = args.rounds * args.inner_steps
    ocfg = OptimConfig(muon_lr=rc["muon_lr"], adamw_lr=rc["adamw_lr"], weight_decay=rc["weight_decay"],
                       warmup_steps=rc["warmup_steps"], total_steps=steps, min_lr_ratio=rc["min_lr_ratio"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.monotonic()
        hist = train(cfg, ocfg, steps, batch_size=args.batch_size, accum=args.micro_batches, seed=rc["data_seed"],
                     init_seed=rc["init_seed"], device="cpu", progress=False, outer_every=args.inner_steps,
                     outer_lr=rc["outer_lr"], outer_momentum=rc["outer_momentum"])
        wall = time.monotonic() - t0
    finally:
        torch.set_num_threads(threads)
    return {"name": "a", "label": "single process", "tokens_per_s": hist["tokens_per_s"], "wall_s": wall,
            "final_loss": hist["loss"][-1]}


def run_subnet(args, boundary: str, workdir: Path, sync: str = "state") -> tuple[dict, list[dict], dict[str, dict], dict]:
    """(b)/(c)/(d): the whole local subnet (no validator) to the end; returns run config, hops, statuses, names."""
    from protocol.bridge_client import BridgeClient
    from protocol.client import BridgeError
    from scripts.localnet_cluster import Cluster
    from scripts.localnet_workdir import prepare_workdir
    workdir = prepare_workdir(workdir)  # never wipes a folder the tool did not make
    rc = subnet_run_config(args, boundary, sync)
    cluster = Cluster(workdir, rc, args.miners_per_stage, validators=0, link_mbps=args.link_mbps,
                      link_latency_ms=args.link_latency_ms, threads_per_miner=1, netlab=_netlab(args))
    t0 = time.monotonic()
    phase = "?"
    try:
        cluster.start()
        client = BridgeClient(cluster.owner_keypair, cluster.bridge_url, None)
        last, last_at = "", 0.0
        while time.monotonic() - t0 < args.timeout:
            try:
                m = client.metrics()
            except (BridgeError, OSError):
                time.sleep(0.5)
                continue
            phase = m.phase
            line = f"round {m.round} {m.phase}"
            if line != last or time.monotonic() - last_at > 15:
                log.info("[%s %5.0fs] %s: %d samples", boundary, time.monotonic() - t0, line, m.completed_total)
                last, last_at = line, time.monotonic()
            crashed = [n.name for n in cluster.miners if not n.alive() and n.proc.returncode not in (0, None)]
            if m.phase == "done" or crashed:
                break
            time.sleep(1.0)
        # Miners leave on their own once told `done`; give them a moment to write their final status.
        end = time.monotonic() + 30
        while time.monotonic() < end and any(n.alive() for n in cluster.miners):
            time.sleep(0.5)
    finally:
        cluster.stop()
    if phase != "done":
        raise RuntimeError(f"subnet run {boundary!r} did not finish (phase {phase}); logs in {workdir / 'logs'}")
    names = {cluster.hotkeys[n.name]: n.name for n in cluster.miners}
    return rc, load_hops(workdir / "bridge.sqlite"), cluster.miner_status(), names


def link_shape(args):
    """The kernel link every miner gets (scripts/netlab_plan.LinkShape)."""
    from scripts.netlab_plan import LinkShape
    return LinkShape(mbps=args.link_mbps, rtt_ms=args.link_latency_ms, jitter_ms=args.link_jitter_ms,
                     loss=args.link_loss)


def _netlab(args):
    from scripts.netlab import NetLab
    return NetLab(0, link_shape(args), backend=args.link_backend, seed=args.seed) if args.link_mode == "kernel" else None


def resolve_link_mode(args) -> str:
    """Settle `auto` and check `kernel` (Misconfigured NO_NETNS, one line, where it is impossible);
    returns the sentence that says which link the runs use."""
    from protocol.exits import Exit, Misconfigured
    from scripts.netlab import NetlabUnavailable, probe
    args.link_backend = "auto"
    if args.link_mode != "process":
        try:
            args.link_backend = probe()
            args.link_mode = "kernel"
        except NetlabUnavailable as exc:
            if args.link_mode == "kernel":
                raise Misconfigured(Exit.NO_NETNS, str(exc)) from None
            args.link_mode = "process"
            return (f"link: in-process emulator, object transfers only ({args.link_mbps:g} Mbit/s, "
                    f"{args.link_latency_ms:g} ms per transfer; bridge calls pay nothing) because {exc}")
    if args.link_mode == "process":
        return (f"link: in-process emulator, object transfers only ({args.link_mbps:g} Mbit/s, "
                f"{args.link_latency_ms:g} ms per transfer; bridge calls pay nothing)")
    how = {"netem": "netem", "tbf": "tbf rate + TUN delay line (this kernel has no netem)"}[args.link_backend]
    return f"link: kernel, one namespace per miner, {link_shape(args).describe()}, shaped by {how}"


def load_hops(db_path: Path) -> list[dict]:
    """Every done hop record of the bridge's database (JSON rows of the hops table)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return [json.loads(d) for (d,) in con.execute("SELECT data FROM hops WHERE status = 'done'")]
    finally:
        con.close()


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def analyse_hops(hops: list[dict], status: dict[str, dict], names: dict[str, str], *,
                 tokens_per_sample: int, mbps: float, latency_ms: float) -> dict:
    """Pure: throughput, boundary bytes and each miner's time split from hop records and statuses.

    Per miner: `train_window` sums, over rounds, last done minus first lease of its hops (merges
    excluded); `held` is the union of its hops' lease-to-done intervals; `idle` = train_window -
    held is time with nothing leased (waiting for the other stage: pipeline fill/drain at every
    inner step, plus the optimizer step itself); `held - compute` is lease round trips, exposed
    downloads, encode and upload before `done`. `link_model` is what the emulated link alone costs
    if every transfer of its hop objects ran one after another (latency + size / bandwidth).
    """
    if not hops:
        raise ValueError("no done hops: the run trained nothing")
    samples = {h["sample_id"] for h in hops}
    span = max(h["done_at"] for h in hops) - min(h["leased_at"] for h in hops)
    fwd = [h["out_size"] for h in hops if h["stage"] == 0 and h["kind"] == "fwd"]
    bwd = [h["out_size"] for h in hops if h["stage"] == 1 and h["kind"] == "fwdbwd"]
    out = {"samples": len(samples), "span_s": span, "tokens_per_s": len(samples) * tokens_per_sample / span,
           "fwd_object_bytes": max(fwd) if fwd else 0, "bwd_object_bytes": max(bwd) if bwd else 0,
           "boundary_bytes": sum(fwd) + sum(bwd)}
    out["bytes_per_token_boundary"] = (out["fwd_object_bytes"] + out["bwd_object_bytes"]) / tokens_per_sample
    last = max(h["round"] for h in hops)  # the training loss of the last round: equal tokens across runs
    losses = [h["loss"] for h in hops if h["kind"] == "fwdbwd" and h["round"] == last and h.get("loss") is not None]
    out["last_round_loss"] = sum(losses) / len(losses) if losses else float("nan")
    miners = []
    for hotkey, name in sorted(names.items(), key=lambda kv: kv[1]):
        mine = [h for h in hops if (h.get("leased_to") or h.get("assigned_to")) == hotkey]
        st = status.get(name, {})
        if not mine:
            continue
        window = 0.0
        for r in sorted({h["round"] for h in mine}):
            in_r = [h for h in mine if h["round"] == r]
            window += max(h["done_at"] for h in in_r) - min(h["leased_at"] for h in in_r)
        held = _union_length([(h["leased_at"], h["done_at"]) for h in mine])
        sizes = [ref[2] for h in mine for ref in (h.get("act_in"), h.get("grad_in")) if ref]
        sizes += [h["out_size"] for h in mine if h["out_size"]]
        link = len(sizes) * latency_ms / 1000 + (sum(sizes) * 8 / (mbps * 1e6) if mbps > 0 else 0.0)
        compute = st.get("compute_seconds", 0.0)
        miners.append({
            "name": name, "stage": mine[0]["stage"], "hops": len(mine), "compute_s": compute,
            "whole_fraction": st.get("compute_fraction", 0.0), "wall_s": st.get("wall_seconds", 0.0),
            "active_s": st.get("active_seconds", 0.0), "active_fraction": st.get("active_compute_fraction", 0.0),
            "train_window_s": window, "train_fraction": compute / window if window > 0 else 0.0,
            "held_s": held, "held_noncompute_s": max(0.0, held - compute), "idle_s": max(0.0, window - held),
            "merge_etc_s": max(0.0, st.get("active_seconds", 0.0) - window), "net_s": st.get("net_seconds", 0.0),
            "link_model_s": link, "link_per_compute": link / compute if compute > 0 else 0.0,
            "bytes_up": st.get("bytes_up", 0), "bytes_down": st.get("bytes_down", 0)})
    out["miners"] = miners
    out["stage_seconds_per_sample"] = [
        sum(m["compute_s"] for m in miners if m["stage"] == s) / len(samples)
        for s in sorted({m["stage"] for m in miners})]
    return out


def stage_balance_text(r: dict, stage_layers: tuple[int, ...]) -> str:
    """One line: the stages' measured compute per sample, how long the faster waits, and the split
    of the blocks that would balance them (resbm.stage_balance)."""
    from resbm.stage_balance import balance_layers
    secs = r.get("stage_seconds_per_sample") or []
    if len(secs) != len(stage_layers) or min(secs, default=0) <= 0:
        return ""
    b = balance_layers(stage_layers, secs)
    r["balance"] = {"layers": list(b.layers), "before": b.before, "after": b.after,
                    "predicted": list(b.predicted)}
    return (f"({r['name']}) stage compute per sample {', '.join(f'{x:.3f}' for x in secs)} s with blocks "
            f"{','.join(map(str, stage_layers))}: the faster stage waits {100 * b.before:.0f}% of the slower's time; "
            f"--stage-layers {','.join(map(str, b.layers))} is predicted to leave {100 * b.after:.0f}%")


def format_table(results: list[dict]) -> str:
    """One markdown table: runs, throughput vs (a), bytes per boundary, per-miner fractions and time split."""
    base = next((r["tokens_per_s"] for r in results if r["name"] == "a"), None)
    head = ("| run | tok/s | vs (a) | bytes/object fwd, bwd | B/token/boundary | miner (stage) | compute s | "
            "active frac | train frac | whole-run frac | idle s | held-not-compute s | merge+ s | net s | link model s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
        if r["name"] == "a":
            lines.append(f"| ({r['name']}) {r['label']} | {r['tokens_per_s']:.0f} | 1.00x | - | - | one process | "
                         f"{r['wall_s']:.1f} | 100% | 100% | 100% | 0 | 0 | - | 0 | 0 |")
            continue
        for i, m in enumerate(r["miners"]):
            lead = (f"| ({r['name']}) {r['label']} | {r['tokens_per_s']:.0f} | {rel} | "
                    f"{r['fwd_object_bytes']:,}, {r['bwd_object_bytes']:,} | {r['bytes_per_token_boundary']:.1f} |"
                    if i == 0 else "| | | | | |")
            lines.append(f"{lead} {m['name']} ({m['stage']}) | {m['compute_s']:.1f} | {100 * m['active_fraction']:.0f}% | "
                         f"{100 * m['train_fraction']:.0f}% | {100 * m['whole_fraction']:.0f}% | {m['idle_s']:.1f} | "
                         f"{m['held_noncompute_s']:.1f} | {m['merge_etc_s']:.1f} | {m['net_s']:.1f} | {m['link_model_s']:.1f} |")
    return "\n".join(lines)


def write_markdown(path: Path, body: str, title: str = SECTION) -> None:
    """Replace (or append) this benchmark's section `title` of `path`, leaving every other section as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{title}\n\n{body.strip()}\n"
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = re.search(r"\n#{1,3} ", text[start + len(title):])  # the next topic or part
        end = start + len(title) + nxt.start() if nxt else -1
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text)


def _load_text() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) at the end on {os.cpu_count()} cores"


def _explain(results: list[dict], args) -> str:
    sub = {r["name"]: r for r in results if r["name"] != "a"}
    lines = []
    for r in sub.values():
        for m in r["miners"]:
            lines.append(f"- ({r['name']}) {m['name']} stage {m['stage']}: of {m['train_window_s']:.1f} s in rounds, "
                         f"{m['compute_s']:.1f} s computing, {m['idle_s']:.1f} s with nothing leased (pipeline "
                         f"fill/drain at each of the {args.rounds * args.inner_steps} inner steps + optimizer steps), "
                         f"{m['held_noncompute_s']:.1f} s holding a lease without computing (lease round trips, "
                         f"exposed downloads, encode + upload before `done`); merges and the wait between rounds "
                         f"{m['merge_etc_s']:.1f} s; the link alone would cost {m['link_model_s']:.1f} s serially "
                         f"({100 * m['link_per_compute']:.0f}% of compute), transfer threads spent {m['net_s']:.1f} s.")
    return "\n".join(lines)


@exits_cleanly
def main(argv=None) -> int:
    """Run the chosen configurations, print the table, optionally write JSON and markdown."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "protocol.chain.local", "resbm.data", "resbm.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in wanted if c not in ("a", "b", "c", "d")]
    if bad or not wanted:
        raise SystemExit(f"--configs takes a comma list of a, b, c, d; got {args.configs!r}")
    workdir = Path(args.workdir).resolve()
    tokens_per_sample = args.batch_size * args.seq_len
    link_text = resolve_link_mode(args) if any(c != "a" for c in wanted) else ""
    if link_text:
        log.info("%s", link_text)
    results, rtt_tables = [], []
    for name in wanted:
        t0 = time.monotonic()
        if name == "a":
            log.info("(a) single process, 1 thread ...")
            results.append(run_single(args))
        else:
            boundary = "none" if name == "b" else "resbm"
            log.info("(%s) local subnet, boundary %s, %s link %.0f Mbit/s %.0f ms ...", name, boundary,
                     args.link_mode, args.link_mbps, args.link_latency_ms)
            sync = "sharded" if name == "d" else "state"
            _rc, hops, status, names = run_subnet(args, boundary, workdir / name, sync)
            r = analyse_hops(hops, status, names, tokens_per_sample=tokens_per_sample, mbps=args.link_mbps,
                             latency_ms=args.link_latency_ms)
            label = {"b": "subnet none", "c": f"subnet resbm r={args.ratio}, whole-state merge",
                     "d": f"subnet resbm r={args.ratio}, sharded sync {args.sync_codec}/{args.sync_merged_codec} "
                          f"S={args.sync_shards} K={args.checkpoint_every}"}[name]
            r.update(name=name, label=label, wall_s=time.monotonic() - t0)
            r["round_trips"] = hop_round_trips(status, rtt_ms=args.link_latency_ms, mbps=args.link_mbps)
            r["other_requests_per_round"] = other_round_trips(status, args.rounds)
            rtt_tables.append(format_rtt_table(f"({name})", r["round_trips"], rtt_ms=args.link_latency_ms,
                                               mbps=args.link_mbps))
            other = format_other_table(f"({name})", r["other_requests_per_round"])
            if other:
                rtt_tables.append("Requests outside a hop's path, per miner per round:\n\n" + other)
            results.append(r)
        log.info("(%s) done in %.0f s", name, time.monotonic() - t0)
    table = format_table(results)
    explain = _explain(results, args)
    cmd = "python scripts/bench_network.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rtt = "\n\n".join(rtt_tables)
    print(table)
    print(explain)
    split = _split(args)
    for r in results:
        if "last_round_loss" in r:
            print(f"({r['name']}) training loss of the last round (mean over its samples): {r['last_round_loss']:.4f}")
            print(stage_balance_text(r, split))
    if link_text:
        print(link_text)
    if rtt:
        print(rtt)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if args.write_md:
        stage_layers = args.stage_layers or "even"
        body = (f"Command: `{cmd.strip()}`  \nMachine: 2-core CPU dev box, no GPU ({platform.processor() or platform.machine()}, "
                f"shared with other work); date {datetime.date.today().isoformat()}.  \n"
                f"Model: d {args.d_model}, {args.layers} layers split {stage_layers}, {args.heads} heads, seq {args.seq_len}, "
                f"batch {args.batch_size}; A = {args.micro_batches} samples per inner step, H = {args.inner_steps}, "
                f"{args.rounds} rounds; 2 stages x {args.miners_per_stage} miner(s), 1 thread each, no validator; "
                f"codec {args.codec}.  \n{link_text or 'no subnet run'}.  \nLoad: {_load_text()}.\n\n{table}\n\n{explain}\n\n"
                f"Round trips on each hop's path (miners' request counters):\n\n{rtt}\n")
        write_markdown(Path(args.write_md), body, KERNEL_SECTION if args.link_mode == "kernel" else SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())

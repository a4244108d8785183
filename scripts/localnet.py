"""A whole ResBM subnet on one machine: S3 server, local chain, bridge, miners, validator.

    python scripts/localnet.py                      # defaults: a few minutes on 2 CPU cores
    python scripts/localnet.py --stages 3 --miners-per-stage 2 --rounds 6
    python scripts/localnet.py --kill-miner-at 2 --restart-bridge-at 3 --cheater random
    sudo python scripts/localnet.py --link-netns --link-mbps 100 --link-latency-ms 50   # kernel links

Shows live progress and ends with a report (validation loss next to the single-process
reference, bytes moved versus the uncompressed model, scores and weights on the local chain,
a PNG loss curve). Ctrl-C stops everything cleanly.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from drills.cheaters import CHEATERS
from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.exits import Exit, Misconfigured, exits_cleanly
from protocol.messages import Metrics
from scripts.localnet_cluster import Cluster
from scripts.localnet_report import build_report, print_report, val_tokens
from scripts.localnet_workdir import prepare_workdir

__all__ = ["main", "build_parser", "run_config_from_args"]

log = logging.getLogger("localnet")


def _run_default(field: str):
    """The run config's default of `field`: the localnet runs what a bridge runs by default."""
    from protocol.run_config import RunConfig
    return RunConfig.model_fields[field].default


def build_parser() -> argparse.ArgumentParser:
    """Every option of the launcher."""
    p = argparse.ArgumentParser(prog="localnet", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--workdir", default="localnet-out", help="where data, logs, wallets and the report go (a new or "
      "empty folder, or one a previous localnet run made: its contents are replaced)")
    a("--stages", type=int, default=2, help="pipeline stages S")
    a("--miners-per-stage", type=int, default=1, help="replicas per stage")
    a("--rounds", type=int, default=10, help="rounds to train (each ends with a merge)")
    a("--d-model", type=int, default=128, help="model width d")
    a("--layers", type=int, default=4, help="transformer blocks (split evenly over stages)")
    a("--heads", type=int, default=4, help="attention heads")
    a("--seq-len", type=int, default=64, help="tokens per sequence")
    a("--boundary", default="resbm", help="none | resbm | resbm-iota | naive")
    a("--ratio", type=int, default=16, help="bottleneck ratio r (k = d / r)")
    a("--codec", default="bf16", help="wire codec: fp32 | bf16 | fp8 | int8")
    a("--batch-size", type=int, default=4, help="sequences per sample")
    a("--micro-batches-per-step", type=int, default=2, help="A: samples per inner step per replica")
    a("--inner-steps", type=int, default=4, help="H: inner steps per round")
    a("--samples-per-round", type=int, default=0, help="N (0 = A x H x miners-per-stage)")
    a("--muon-lr", type=float, default=0.02, help="inner Muon lr")
    a("--adamw-lr", type=float, default=3e-3, help="inner AdamW lr")
    a("--outer-lr", type=float, default=0.7, help="outer Nesterov lr")
    a("--outer-momentum", type=float, default=0.5, help="outer Nesterov momentum")
    a("--seed", type=int, default=1, help="data and init seed")
    a("--device", default="cpu", help="miners' device (cpu, cuda, mps, auto)")
    a("--dtype", default="float32", help="miners' compute dtype (float32, or bfloat16 autocast on cuda)")
    a("--link-netns", action="store_true", help="kernel links: every miner and validator in its own network "
      "namespace behind a shaped link to the bridge and S3, so every request pays it (needs root)")
    a("--link-mbps", type=float, default=0.0, help="link bandwidth each way (0 = unlimited); without "
      "--link-netns, emulated in-process for object transfers only")
    a("--link-latency-ms", type=float, default=0.0, help="with --link-netns, the round-trip time the link adds "
      "to every packet; without, latency added per object transfer")
    a("--link-jitter-ms", type=float, default=0.0, help="with --link-netns: spread of that round trip (+- half)")
    a("--link-loss", type=float, default=0.0, help="with --link-netns: fraction of packets lost each way")
    a("--kill-miner-at", type=int, default=-1, help="in this round, kill one replica of every stage, restart it later")
    a("--restart-bridge-at", type=int, default=-1, help="in this round, kill the bridge and restart it")
    a("--cheater", default=[], action="append", choices=list(CHEATERS),
      help="add an adversarial miner of this kind (drills.miner; docs/SECURITY.md); repeat to add "
           "one per stage, each joining after the honest replicas")
    a("--sync", default=_run_default("sync_mode"), choices=("sharded", "state"),
      help="replica sync at a round's end: sharded, compressed merged updates, or the whole-state merge")
    a("--sync-shards", type=int, default=_run_default("sync_shards"), help="shards of each stage's parameters "
      "(--sync sharded)")
    a("--sync-codec", default=_run_default("sync_codec"), help="pseudo-gradient codec: fp32 | int8 | int4 | int2")
    a("--sync-merged-codec", default=_run_default("sync_merged_codec"), help="merged-update codec: fp32 | int8 | "
      "int4 | int2")
    a("--checkpoint-every", type=int, default=_run_default("checkpoint_every"), help="K: a full checkpoint every "
      "K rounds (and at the end)")
    a("--lease-seconds", type=float, default=20.0, help="hop lease length")
    a("--s3-endpoint", default="", help="use this S3 endpoint instead of starting rclone")
    a("--s3-access-key", default="", help="access key for --s3-endpoint")
    a("--s3-secret-key", default="", help="secret key for --s3-endpoint")
    a("--no-reference", action="store_true", help="skip the single-process reference run in the report")
    a("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    return p


def run_config_from_args(args: argparse.Namespace) -> dict:
    """The RunConfig mapping the bridge is started with."""
    from resbm.config import ModelConfig
    model = ModelConfig.preset("tiny", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                               seq_len=args.seq_len, n_stages=args.stages, boundary=args.boundary,
                               bottleneck_ratio=args.ratio, wire_codec=args.codec).to_dict()
    n = args.samples_per_round or args.micro_batches_per_step * args.inner_steps * args.miners_per_stage
    return dict(run_id="localnet", model=model, n_stages=args.stages, batch_size=args.batch_size,
                micro_batches_per_step=args.micro_batches_per_step, inner_steps_per_round=args.inner_steps,
                samples_per_round=n, muon_lr=args.muon_lr, adamw_lr=args.adamw_lr, weight_decay=0.0,
                warmup_steps=2, total_rounds=args.rounds, min_lr_ratio=0.1, outer_lr=args.outer_lr,
                outer_momentum=args.outer_momentum, data_seed=args.seed, init_seed=args.seed,
                lease_seconds=args.lease_seconds, max_object_bytes=64 * 2**20, max_state_bytes=1 << 30, max_attempts=5,
                merge_timeout_seconds=30.0, audit_window_rounds=max(4, args.rounds + 1), version_key=1,
                incentives={"audit_fraction": 1.0},  # a drill: audit every miner every round
                sync_mode=args.sync, sync_shards=args.sync_shards, sync_codec=args.sync_codec,
                sync_merged_codec=args.sync_merged_codec, checkpoint_every=args.checkpoint_every,
                # the validators' live held-out loss on the report's own windows: the two agree
                val_tokens=val_tokens(args.batch_size, args.seq_len))


def kernel_links(args: argparse.Namespace):
    """The NetLab of --link-netns (None without it); one-line Misconfigured where it cannot be made."""
    from scripts.netlab import NetLab, NetlabUnavailable, probe
    from scripts.netlab_plan import LinkShape
    if not args.link_netns:
        if args.link_jitter_ms or args.link_loss:
            raise Misconfigured(Exit.USAGE, "--link-jitter-ms and --link-loss shape kernel links only; add --link-netns")
        return None
    if args.s3_endpoint:
        raise Misconfigured(Exit.USAGE, "--link-netns runs its own S3 inside the emulated network; drop --s3-endpoint")
    try:
        shape = LinkShape(mbps=args.link_mbps, rtt_ms=args.link_latency_ms, jitter_ms=args.link_jitter_ms,
                          loss=args.link_loss)
    except ValueError as exc:
        raise Misconfigured(Exit.USAGE, f"{exc}; fix --link-mbps/--link-latency-ms/--link-jitter-ms/--link-loss") from None
    try:
        backend = probe()
    except NetlabUnavailable as exc:
        raise Misconfigured(Exit.NO_NETNS, str(exc)) from None
    return NetLab(0, shape, backend=backend, seed=args.seed)


def _drills(args, cluster: Cluster, m: Metrics, done: set, bar) -> None:
    mid_round = m.phase == "train" and 0 < m.samples_completed < m.samples_total
    if args.kill_miner_at == m.round and mid_round and "kill" not in done:
        done.add("kill")
        by_hotkey = {mm.hotkey: mm.stage for mm in m.miners}
        victims = []
        for stage in range(args.stages):  # one replica of every stage
            victims += [n for n in cluster.miners if by_hotkey.get(cluster.hotkeys[n.name]) == stage][:1]
        for v in victims:
            v.kill()
        bar.write(f"[drill] round {m.round}: killed {', '.join(v.name for v in victims)}")
        cluster.restart_after = (time.monotonic() + 8.0, victims)
    pending = getattr(cluster, "restart_after", None)
    if pending and time.monotonic() > pending[0]:
        for v in pending[1]:
            v.restarts += 1
            v.start()
        bar.write(f"[drill] restarted {', '.join(v.name for v in pending[1])}")
        cluster.restart_after = None
    if args.restart_bridge_at == m.round and mid_round and "bridge" not in done:
        done.add("bridge")
        cluster.restart_bridge()
        bar.write(f"[drill] round {m.round}: bridge killed and restarted")


def _wait_for_weights(cluster: Cluster, timeout: float) -> None:
    end = time.monotonic() + timeout
    hotkeys = [cluster.hotkeys[n.name] for n in cluster.validator_procs]
    while time.monotonic() < end:
        if all(cluster.chain.weights_of(hk) for hk in hotkeys) and all(_validator_caught_up(cluster, n) for n in cluster.validator_procs):
            return
        time.sleep(1.0)


def _validator_caught_up(cluster: Cluster, n) -> bool:
    p = cluster.workdir / f"{n.name}.state.json"
    try:
        state = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return state.get("next_round", 0) >= cluster.run_config["total_rounds"] and not state.get("pending_window")


@exits_cleanly
def main(argv=None) -> int:
    """Run the local subnet to the end of its rounds and print the report."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "protocol.chain.local", "matplotlib", "resbm.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    netlab = kernel_links(args)
    workdir = prepare_workdir(args.workdir)
    run_config = run_config_from_args(args)
    cluster = Cluster(workdir, run_config, args.miners_per_stage, device=args.device, miner_args=["--dtype", args.dtype],
                      link_mbps=args.link_mbps, link_latency_ms=args.link_latency_ms, cheaters=args.cheater,
                      s3_endpoint=args.s3_endpoint, s3_keys=(args.s3_access_key, args.s3_secret_key), netlab=netlab)
    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.monotonic()
    print(f"localnet: {args.stages} stages x {args.miners_per_stage} miners, {args.rounds} rounds, "
          f"model d={args.d_model} L={args.layers} ({args.boundary} r={args.ratio}, {args.codec}); logs in {workdir / 'logs'}")
    losses: list[tuple[float, int, float]] = []
    try:
        cluster.start()
        client = BridgeClient(cluster.owner_keypair, cluster.bridge_url, None)
        if netlab is not None:
            print(f"links: kernel, one namespace per neuron, {netlab.shape.describe()} ({netlab.backend_text}); "
                  f"bridge and S3 at {netlab.services_addr}", flush=True)
        elif args.link_mbps or args.link_latency_ms:
            print(f"links: in-process emulator, object transfers only ({args.link_mbps:g} Mbit/s, "
                  f"{args.link_latency_ms:g} ms per transfer)", flush=True)
        print(f"dashboard: {cluster.bridge_url}/ (live while the run lasts; Prometheus at {cluster.bridge_url}/metrics)",
              flush=True)
        total = args.rounds * run_config["samples_per_round"]
        tty = sys.stderr.isatty()
        bar = tqdm(total=total, unit="sample", desc="training", dynamic_ncols=True, disable=not tty)
        last_line = ""
        done_drills: set = set()
        last_finished = -1
        while not stopping["flag"]:
            if time.monotonic() - t0 > args.timeout:
                bar.write("timeout reached; stopping")
                break
            try:
                m = client.metrics()
            except (BridgeError, OSError):
                time.sleep(0.5)
                continue
            finished = m.completed_total + m.abandoned_total
            bar.n = min(total, finished)
            recent = m.recent_losses
            if recent and finished != last_finished:
                tail = recent[-8:]
                losses.append((time.monotonic() - t0, finished, sum(tail) / len(tail)))
                last_finished = finished
            status = cluster.miner_status()
            tps = sum(s.get("tokens_per_s", 0.0) for s in status.values()) / max(1, args.stages)
            line = (f"round {min(m.round, args.rounds - 1) + (1 if m.phase == 'done' else 0)}/{args.rounds} "
                    f"{m.phase} loss {recent[-1] if recent else float('nan'):.3f} "
                    f"tok/s {tps:,.0f} reroutes {sum(s.reroutes for s in m.stages)}")
            bar.set_postfix_str(line)
            bar.refresh()
            if not tty and line.split(" loss")[0] != last_line.split(" loss")[0]:
                print(f"[{time.monotonic() - t0:6.1f}s] {finished}/{total} samples | {line}", flush=True)
            last_line = line
            _drills(args, cluster, m, done_drills, bar)
            if m.phase == "done":
                break
            time.sleep(1.0)
        bar.close()
        if not stopping["flag"] and m.phase == "done":
            print("training done; waiting for the validator to audit the last round and set weights ...")
            _wait_for_weights(cluster, timeout=120.0)
        train_seconds = time.monotonic() - t0
        print("building the report (validation curves; the single-process reference run takes a while) ...")
        report = build_report(args, cluster, client, losses, train_seconds)
        report["total_seconds"] = round(time.monotonic() - t0, 1)
    finally:
        cluster.stop()
    print_report(report)
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {workdir / 'report.json'}")
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

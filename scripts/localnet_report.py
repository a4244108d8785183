"""The localnet's closing report: validation loss of the merged weights next to the single-process
reference (as curves over rounds), bytes moved versus the uncompressed model, miners' scores and
weights on the chain, and a PNG of the curves.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import boto3
import torch
from botocore.config import Config

from protocol.messages import Metrics
from resbm import codec, data
from resbm.config import ModelConfig
from resbm.optim import OptimConfig
from resbm.stages import build_stages
from resbm.train import evaluate, train

__all__ = ["build_report", "print_report", "final_states", "validation_loss", "subnet_val_curve",
           "reference_val_curve", "COLUMNS"]

COLUMNS = {
    "hops": "hops the miner completed (forward and backward passes of samples)",
    "score": "the validator's smoothed score: verified throughput (audited work), an EMA over windows",
    "weight": "the share of the validator's weights it set on chain for this uid",
    "compute": "share of the miner's wall time spent computing; the rest is waiting for work, "
               "inputs and uploads (a tiny model on a CPU waits most of the time)",
}

log = logging.getLogger("localnet")
VAL_BATCHES = 8


def _s3(cluster):
    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, aws_access_key_id=cluster.s3_keys[0],
                        aws_secret_access_key=cluster.s3_keys[1], region_name="us-east-1",
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def _theta(blob: bytes, max_bytes: int) -> dict:
    """The weights of a published state: a whole-state merge's, or a sharded sync's checkpoint
    (which also holds `sync.refs`, one clip reference per shard)."""
    if len(blob) > max_bytes:
        raise ValueError(f"state of {len(blob)} bytes is over {max_bytes}")
    from safetensors.torch import load  # safetensors, never pickle
    return {k[len("theta."):]: v for k, v in load(blob).items() if k.startswith("theta.")}


def final_states(cluster, m: Metrics, cfg: ModelConfig) -> list[dict] | None:
    """Each stage's last published theta, read from the object store (None if any is missing)."""
    s3 = _s3(cluster)
    run_id = cluster.run_config["run_id"]
    thetas = []
    for st in m.stages:
        if st.state_sha is None:
            return None
        prefix = f"runs/{run_id}/r{st.published_round}/s{st.stage}/state/"
        listed = s3.list_objects_v2(Bucket="resbm", Prefix=prefix).get("Contents", []) or []
        keys = [o["Key"] for o in listed if o["Key"].endswith(f"-{st.state_sha}")]  # voters' copies
        if not keys:
            return None
        blob = s3.get_object(Bucket="resbm", Key=keys[0])["Body"].read()
        theta = _theta(blob, cluster.run_config.get("max_state_bytes", 2**32))
        thetas.append(theta)
    return thetas


def validation_loss(cfg: ModelConfig, thetas: list[dict] | None, batch_size: int, init_seed: int) -> float:
    """Mean validation loss of the stages (built from init_seed, then loaded with `thetas`)."""
    stages = build_stages(cfg, seed=init_seed)
    if thetas is not None:
        for stage, theta in zip(stages, thetas):
            stage.load_state_dict(theta)
    batches = data.validation_batches(VAL_BATCHES, batch_size, cfg.seq_len)
    return evaluate(stages, batches, torch.device("cpu"))


def subnet_val_curve(cluster, cfg: ModelConfig, client=None) -> list[tuple[int, float]]:
    """(samples trained, validation loss) of the merged weights at the start of every round: the
    published state in the object store, or under the sharded sync (with `client`) the last
    checkpoint plus the decided updates since, through the bridge's views, so rounds between
    checkpoints count too; rounds whose weights are gone are skipped."""
    rc = cluster.run_config
    per_round = rc["samples_per_round"]
    curve = [(0, validation_loss(cfg, None, rc["batch_size"], rc["init_seed"]))]
    sharded = rc.get("sync_mode", "sharded") == "sharded" and client is not None
    for rnd in range(1, rc["total_rounds"] + 1):
        thetas = (_sharded_thetas(client, rc, cfg, rnd) if sharded else None) or _stored_thetas(cluster, cfg, rnd)
        if thetas is not None:
            curve.append((rnd * per_round, validation_loss(cfg, thetas, rc["batch_size"], rc["init_seed"])))
    return curve


def _stored_thetas(cluster, cfg: ModelConfig, rnd: int) -> list[dict] | None:
    """Every stage's published state of round rnd in the object store (None if one is missing)."""
    rc = cluster.run_config
    s3, thetas = _s3(cluster), []
    for stage in range(cfg.n_stages):
        found = s3.list_objects_v2(Bucket="resbm", Prefix=f"runs/{rc['run_id']}/r{rnd}/s{stage}/state/")
        keys = [o["Key"] for o in found.get("Contents", [])]
        if not keys:
            return None
        blob = s3.get_object(Bucket="resbm", Key=keys[0])["Body"].read()
        thetas.append(_theta(blob, rc.get("max_state_bytes", 2**32)))
    return thetas


def _sharded_thetas(client, rc: dict, cfg: ModelConfig, rnd: int) -> list[dict] | None:
    """Every stage's weights after round rnd - 1's decided update (None where it is not kept)."""
    from protocol.client import BridgeError
    from protocol.messages import RunConfig
    from neurons.shard_sync import sync_settings
    from neurons.stage_worker import worker_for_run
    from neurons.sync_follow import get_view, start_of_round
    from neurons.transfer import ObjectTransfer, TransferError
    run = RunConfig(**rc)
    sync, transfer = sync_settings(run), ObjectTransfer()
    thetas = []
    try:
        for stage in range(cfg.n_stages):
            worker = worker_for_run(run, stage, "cpu")
            view = get_view(client, rnd - 1, stage)
            if not view.complete:
                return None
            st = start_of_round(transfer, view, worker.param_shapes, sync.layout(worker.param_shapes), sync,
                                run.max_state_bytes, worker.theta, through=rnd - 1)
            thetas.append(st.theta)
    except (BridgeError, TransferError) as exc:
        log.info("no weights for the start of round %d: %s", rnd, exc)
        return None
    finally:
        transfer.close()
    return thetas


def _plot(path: Path, losses: list, ref_curve: list, curve: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.plot([x[1] for x in losses], [x[2] for x in losses], color="C0", alpha=0.5,
                label="training loss (last stage, recent mean)")
    if curve:
        ax.plot([x[0] for x in curve], [x[1] for x in curve], "o-", color="C1",
                label=f"subnet validation loss (merged weights per round), final {curve[-1][1]:.3f}")
    if ref_curve:
        ax.plot([x[0] for x in ref_curve], [x[1] for x in ref_curve], "s:", color="C2",
                label=f"single-process reference, same tokens, final {ref_curve[-1][1]:.3f}")
    ax.set_xlabel("samples finished")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("ResBM local subnet")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(args, cluster, client, losses: list, wall: float) -> dict:
    """Collect every figure of the closing report into one JSON-able dict."""
    rc = cluster.run_config
    cfg = ModelConfig.from_dict(rc["model"])
    m = client.metrics()
    report: dict = {"wall_seconds": round(wall, 1), "rounds": rc["total_rounds"], "phase": m.phase,
                    "samples_completed": m.completed_total, "samples_abandoned": m.abandoned_total,
                    "abandon_reasons": m.abandon_reasons, "bridge_restarts": cluster.bridge.restarts,
                    "miner_restarts": sum(n.restarts for n in cluster.miners),
                    "killed": [n.name for n in cluster.miners if n.restarts]}
    thetas = final_states(cluster, m, cfg) if m.phase == "done" else None
    report["val_loss_init"] = validation_loss(cfg, None, rc["batch_size"], rc["init_seed"])
    report["val_loss_final"] = validation_loss(cfg, thetas, rc["batch_size"], rc["init_seed"]) if thetas else None
    curve = subnet_val_curve(cluster, cfg, client) if thetas else []
    report["val_curve"] = [[x, round(v, 4)] for x, v in curve]
    ref_curve: list = []
    if not args.no_reference and thetas:
        ref_curve = reference_val_curve(cfg, rc, m.completed_total)
        report["val_loss_reference"] = ref_curve[-1][1]
    report["val_curve_reference"] = [[x, round(v, 4)] for x, v in ref_curve]
    shape_k, shape_d = cfg.code_shape(rc["batch_size"]), (rc["batch_size"], cfg.seq_len, cfg.d_model)
    hop_objects = sum(st.hops_done for st in m.stages) - m.completed_total  # stage-0 bwd uploads nothing
    report["bytes"] = {
        "boundary_bytes_moved": sum(st.bytes_moved for st in m.stages),
        "uncompressed_equivalent": hop_objects * codec.wire_size(shape_d, "bf16"),
        "code_object_bytes": codec.wire_size(shape_k, cfg.wire_codec),
        "per_token_per_boundary_fwd_bwd": 2 * codec.wire_size(shape_k, cfg.wire_codec) / (rc["batch_size"] * cfg.seq_len),
    }
    b = report["bytes"]
    b["ratio_vs_uncompressed"] = b["boundary_bytes_moved"] / b["uncompressed_equivalent"] if b["uncompressed_equivalent"] else None
    mg = cluster.chain.metagraph()
    weights = {}
    for n in cluster.validator_procs:
        weights.update({str(k): v for k, v in cluster.chain.weights_of(cluster.hotkeys[n.name]).items()})
    scores = {}
    for n in cluster.validator_procs:
        p = cluster.workdir / f"{n.name}.state.json.scores"
        if p.exists():
            scores = {hk: v["ema"] for hk, v in json.loads(p.read_text())["miners"].items()}
    status = cluster.miner_status()
    miners = []
    by_hotkey = {mm.hotkey: mm for mm in m.miners}
    for n in cluster.miners:
        hk = cluster.hotkeys[n.name]
        mm, st, uid = by_hotkey.get(hk), status.get(n.name, {}), mg.uid_of(hk)
        miners.append({"name": n.name, "uid": uid, "stage": mm.stage if mm else None,
                       "hops": mm.hops_done if mm else 0, "score": round(scores.get(hk, 0.0), 4),
                       "weight": round(weights.get(str(uid), 0.0), 4),
                       "compute_fraction": round(st.get("compute_fraction", 0.0), 3),
                       "cheat": n.argv[n.argv.index("--cheat") + 1] if "--cheat" in n.argv else "honest"})
    owner_uid = mg.uid_of(mg.owner_hotkey)
    report["miners"] = miners
    report["owner_weight"] = round(weights.get(str(owner_uid), 0.0), 4)
    report["weights_set"] = bool(weights)
    report["incentives"] = {str(k): round(v, 4) for k, v in cluster.chain.incentives().items()}
    png = cluster.workdir / "loss_curve.png"
    _plot(png, losses, ref_curve, curve)
    report["loss_curve_png"] = str(png)
    report["loss_curve"] = [[round(t, 1), s, round(x, 4)] for t, s, x in losses]
    report["dashboard_url"] = cluster.bridge_url + "/"
    report["ok"] = m.phase == "done" and report["val_loss_final"] is not None
    return report


def reference_val_curve(cfg: ModelConfig, rc: dict, total_samples: int) -> list[tuple[int, float]]:
    """(samples trained, validation loss) of the single-process reference trained on the same
    samples, measured at every round boundary (the last point is the final loss)."""
    steps = max(1, total_samples // rc["micro_batches_per_step"])
    per_round = max(1, rc["samples_per_round"] // rc["micro_batches_per_step"])
    ocfg = OptimConfig(muon_lr=rc["muon_lr"], adamw_lr=rc["adamw_lr"], weight_decay=rc["weight_decay"],
                       warmup_steps=rc["warmup_steps"], total_steps=steps, min_lr_ratio=rc["min_lr_ratio"])
    hist = train(cfg, ocfg, steps, batch_size=rc["batch_size"], accum=rc["micro_batches_per_step"],
                 seed=rc["data_seed"], init_seed=rc["init_seed"], device="cpu", progress=False,
                 val_every=per_round, val_batches=VAL_BATCHES)
    start = validation_loss(cfg, None, rc["batch_size"], rc["init_seed"])
    return [(0, start)] + [(s * rc["micro_batches_per_step"], v)
                           for s, v in zip(hist["val_step"], hist["val_loss"])]


def print_report(r: dict) -> None:
    """Print the report as a few readable lines and a miner table."""
    def f(x):
        return "n/a" if x is None else f"{x:.4f}"
    print("\n=== localnet report ===")
    total = r.get("total_seconds", r["wall_seconds"])
    print(f"wall time {total}s (training {r['wall_seconds']}s, report and reference run "
          f"{round(total - r['wall_seconds'], 1)}s), {r['rounds']} rounds, phase {r['phase']}; samples completed "
          f"{r['samples_completed']}, abandoned {r['samples_abandoned']} {r['abandon_reasons'] or ''}")
    print(f"validation loss: start {f(r['val_loss_init'])} -> subnet {f(r['val_loss_final'])}"
          f" | single-process reference, same tokens: {f(r.get('val_loss_reference'))}")
    b = r["bytes"]
    ratio = "n/a" if b["ratio_vs_uncompressed"] is None else f"{1 / b['ratio_vs_uncompressed']:.1f}x less"
    print(f"boundary traffic: {b['boundary_bytes_moved'] / 1e6:.2f} MB moved vs {b['uncompressed_equivalent'] / 1e6:.2f} MB "
          f"uncompressed ({ratio}); {b['per_token_per_boundary_fwd_bwd']:.1f} bytes/token/boundary fwd+bwd")
    print(f"restarts: bridge {r['bridge_restarts']}, miners {r['miner_restarts']}; weights set on chain: {r['weights_set']}, "
          f"owner (burn) weight {r['owner_weight']}")
    print(f"{'miner':<8} {'uid':>3} {'stage':>5} {'hops':>5} {'score':>8} {'weight':>7} {'compute':>8}  behaviour")
    for m in r["miners"]:
        print(f"{m['name']:<8} {m['uid']!s:>3} {m['stage']!s:>5} {m['hops']:>5} {m['score']:>8.3f} {m['weight']:>7.3f} "
              f"{100 * m['compute_fraction']:>7.0f}%  {m['cheat']}")
    for name, meaning in COLUMNS.items():
        print(f"  {name}: {meaning}")
    print(f"loss curves: {r['loss_curve_png']}")
    print(f"dashboard (while the bridge ran): {r.get('dashboard_url', 'n/a')}")

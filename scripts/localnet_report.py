"""The localnet's closing report: validation loss of the merged weights next to the single-process
reference (as curves over rounds), bytes moved versus the uncompressed model, miners' scores and
weights on the chain, a PNG of the curves, and the trained model exported to `<workdir>/model`.

The subnet's weights of every round come from the bridge's published model (`GET /v1/model`,
verified against the replicas' votes by neurons.model_fetch, both sync modes); every validation
figure is resbm.evaluate's, on the same fixed windows the validators and the reference use.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from neurons.model_fetch import ModelUnavailable, fetch_weights, published_from_bridge
from neurons.transfer import ObjectTransfer
from resbm import codec, data
from resbm.config import ModelConfig
from resbm.evaluate import evaluate_lm, held_out_batches
from resbm.export import stitch
from resbm.model import build_model
from resbm.optim import OptimConfig
from resbm.train import train
from scripts.export_model import write_model

__all__ = ["build_report", "print_report", "validation_loss", "subnet_val_curve", "reference_val_curve",
           "val_tokens", "COLUMNS", "VAL_BATCHES"]

COLUMNS = {
    "hops": "hops the miner completed (forward and backward passes of samples)",
    "score": "the validator's smoothed score: verified throughput (audited work), an EMA over windows",
    "weight": "the share of the validator's weights it set on chain for this uid",
    "compute": "share of the miner's wall time spent computing; the rest is waiting for work, "
               "inputs and uploads (a tiny model on a CPU waits most of the time)",
}

log = logging.getLogger("localnet")
VAL_BATCHES = 8  # micro-batches of held-out windows: the reference trainer's val_batches


def val_tokens(batch_size: int, seq_len: int) -> int:
    """Held-out tokens of every validation figure of a localnet (its run config's val_tokens too)."""
    return VAL_BATCHES * batch_size * seq_len


def validation_loss(cfg: ModelConfig, thetas: list[dict] | None, batch_size: int, init_seed: int) -> float:
    """Held-out loss of the model stitched from the stage weights `thetas` (None: the init)."""
    model = build_model(cfg, seed=init_seed)
    if thetas is not None:
        model.load_state_dict(stitch(thetas, cfg))
    batches = held_out_batches(data.load(), val_tokens(batch_size, cfg.seq_len), cfg.seq_len)
    return evaluate_lm(lambda t: model(t), batches).loss


def _published(cluster, rnd: int | None):
    """The verified weights after round `rnd` (None: the latest), or None when not exportable."""
    try:
        return fetch_weights(ObjectTransfer(), published_from_bridge(cluster.bridge_url, rnd))
    except ModelUnavailable as exc:
        log.warning("no model for round %s: %s", rnd, exc)
        return None


def subnet_val_curve(cluster, cfg: ModelConfig) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(samples trained, validation loss) of the published model after every round, and the
    validators' live figure of the rounds they reported so far; rounds whose model is not
    exportable are skipped."""
    rc = cluster.run_config
    per_round = rc["samples_per_round"]
    curve = [(0, validation_loss(cfg, None, rc["batch_size"], rc["init_seed"]))]
    live = []
    for rnd in range(rc["total_rounds"]):
        got = _published(cluster, rnd)
        if got is not None:
            curve.append(((rnd + 1) * per_round, validation_loss(cfg, got.thetas, rc["batch_size"], rc["init_seed"])))
            if got.published.validation is not None:
                live.append(((rnd + 1) * per_round, got.published.validation.loss))
    return curve, live


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
    final = _published(cluster, None) if m.phase == "done" else None
    thetas = final.thetas if final is not None else None
    report["val_loss_init"] = validation_loss(cfg, None, rc["batch_size"], rc["init_seed"])
    report["val_loss_final"] = validation_loss(cfg, thetas, rc["batch_size"], rc["init_seed"]) if thetas else None
    v = final.published.validation if final is not None else None
    report["val_loss_validators"] = None if v is None else {"loss": v.loss, "validators": v.validators,
                                                            "tokens": v.tokens}
    report["model_dir"] = None
    if final is not None:
        report["model_dir"] = str(write_model(final, data.load(), str(cluster.workdir / "model"),
                                              cluster.bridge_url, force=True))
    curve, live = subnet_val_curve(cluster, cfg) if thetas else ([], [])
    report["val_curve"] = [[x, round(v, 4)] for x, v in curve]
    report["val_curve_validators"] = [[x, v] for x, v in live]  # unrounded: tests compare them
    report["val_curve_exact"] = [[x, v] for x, v in curve]
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
    v = r.get("val_loss_validators")
    if v:
        print(f"validators' live figure for the last round: {v['loss']:.4f} (median of {v['validators']}, "
              f"{v['tokens']} tokens)")
    elif r.get("val_curve_validators"):
        print(f"validators' live figures so far: {len(r['val_curve_validators'])} round(s) (the validator is "
              "still auditing the later ones)")
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
    if r.get("model_dir"):
        print(f"trained model: {r['model_dir']} (resbm-generate --model {r['model_dir']} --prompt \"...\")")
    print(f"dashboard (while the bridge ran): {r.get('dashboard_url', 'n/a')}")

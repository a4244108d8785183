"""resbm-export: the model a subnet trained, out of the subnet into one folder, every byte verified.

    resbm-export --bridge http://127.0.0.1:8600 --out my-model              # the latest round
    resbm-export --bridge https://bridge.example:8600 --round 120 --out my-model-r120
    resbm-export --s3 s3://resbm/runs/RUN_ID --s3-endpoint https://... --out my-model   # + S3 keys

From a bridge it reads the public `GET /v1/model` (no wallet needed); from the bucket alone, the
copy of it the bridge writes after every round (read access to the bucket suffices). Each stage's
state, or checkpoint and decided updates under the sharded sync, is checked against the sha256
its replicas voted for; the folder (model.safetensors, config.json, tokenizer.json, export.json,
README.md) appears in one rename, and a non-empty --out is refused unless --force.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from neurons.dataset_http import HttpSource
from neurons.model_fetch import FetchedModel, ModelUnavailable, download_bytes, fetch_weights, published_from_bridge
from neurons.transfer import ObjectTransfer
from protocol.exits import Exit, Misconfigured, exits_cleanly
from protocol.model_messages import PublishedModel
from protocol.settings import load_settings
from resbm import data
from resbm.dataset import Dataset, open_dataset
from resbm.dataset_store import DataError
from resbm.evaluate import evaluate_lm, held_out_batches, token_byte_lengths
from resbm.export import ExportError, check_target, stitch, write_export
from resbm.model import ResBM
from scripts.bucket_model import BucketObjects, BucketSource, published_from_bucket
from scripts.model_cli import ModelToolSettings, device_of, flag, progress_bar, quiet_logs

__all__ = ["ExportSettings", "export_info", "run_dataset", "write_model", "main"]


class ExportSettings(ModelToolSettings):
    """Settings of resbm-export."""

    bridge: str = flag("", "the bridge's base URL (reads its public GET /v1/model; no wallet needed)")
    s3: str = flag("", "instead of --bridge: the run's folder in its bucket, s3://BUCKET/runs/RUN_ID")
    s3_endpoint: str = flag("", "S3 endpoint URL for --s3 (AWS, R2, MinIO, rclone serve s3)")
    s3_access_key: str = flag("", "S3 access key for --s3 (read access is enough)")
    s3_secret_key: str = flag("", "S3 secret key for --s3")
    s3_region: str = flag("us-east-1", "S3 region for --s3")
    round: Optional[int] = flag(None, "the round whose published model to export (default: the latest)")
    out: str = flag("", "the folder to write (new, or empty; see --force)")
    force: bool = flag(False, "replace a non-empty --out")
    eval_tokens: int = flag(0, "also measure the validation loss on this many held-out tokens of the "
                            "run's dataset and put it in the model card (0 = off)")


def _bucket(s: ExportSettings) -> tuple[BucketObjects, str]:
    if not s.s3.startswith("s3://") or "/" not in s.s3[5:].strip("/"):
        raise Misconfigured(Exit.USAGE, f"--s3 {s.s3!r}: give the run's folder, s3://BUCKET/runs/RUN_ID")
    bucket, prefix = s.s3[5:].strip("/").split("/", 1)
    import boto3
    from botocore.config import Config
    client = boto3.client("s3", endpoint_url=s.s3_endpoint or None, aws_access_key_id=s.s3_access_key or None,
                          aws_secret_access_key=s.s3_secret_key or None, region_name=s.s3_region,
                          config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                        retries={"max_attempts": 3, "mode": "standard"}))
    return BucketObjects(client, bucket), prefix


def run_dataset(pm: PublishedModel, bridge_url: str = "", objects: Optional[BucketObjects] = None) -> Dataset:
    """The run's dataset (for its tokenizer and validation split), through the bridge or the bucket."""
    ref = pm.run.dataset
    if ref is not None and not ref.is_url and objects is not None:  # a bucket key: read it next door
        folder = ref.manifest.rsplit("/", 1)[0] if "/" in ref.manifest else ""
        return open_dataset(ref, bridge_url=f"s3://{objects.bucket}", remote=lambda _: BucketSource(objects, folder))
    return data.open_run_dataset(ref, bridge_url or None, HttpSource)  # as the validators open it


def export_info(pm: PublishedModel, source: str, ds: Dataset, measured: Optional[dict[str, Any]]) -> dict[str, Any]:
    """export.json: provenance, sizes, losses and the per-stage hashes (the model card says it in words)."""
    seq_len = int(pm.run.model.get("seq_len", 0))
    samples = pm.samples
    return {
        "run_id": pm.run.run_id, "round": pm.round, "latest_round": pm.latest, "total_rounds": pm.run.total_rounds,
        "sync_mode": pm.run.sync_mode, "samples_trained": samples, "batch_size": pm.run.batch_size,
        "tokens_trained": None if samples is None else samples * pm.run.batch_size * seq_len,
        "training_loss": pm.training_loss,
        "validation": None if pm.validation is None else pm.validation.model_dump(),
        "measured": measured,
        "stages": [{"stage": x.stage, "sha256": x.state.sha256 if x.state else None,
                    "checkpoint_round": x.checkpoint_round, "updates": len(x.updates),
                    "update_sha256": [[u.sha256 if u else None for u in upd.shards] for upd in x.updates]}
                   for x in pm.stages],
        "dataset": None if pm.run.dataset is None else pm.run.dataset.model_dump(),
        "eot_id": ds.manifest.eot_id, "source": source,
        "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _measure(fetched: FetchedModel, state: dict, ds: Dataset, tokens: int, device: str) -> dict[str, Any]:
    model = ResBM(fetched.config)
    model.load_state_dict(state)
    model.to(device).eval()
    cfg = fetched.config
    batches = held_out_batches(ds, tokens, cfg.seq_len)
    lengths = token_byte_lengths(ds.file_path(ds.manifest.tokenizer.name), cfg.vocab_size)
    r = evaluate_lm(lambda t: model(t), batches, lengths, device)
    return {"split": "val", **r.as_dict()}


def write_model(fetched: FetchedModel, ds: Dataset, out: str, source: str, force: bool = False,
                eval_tokens: int = 0, device: str = "cpu") -> Path:
    """Stitch the fetched stages, optionally measure them, and write the export folder."""
    state = stitch(fetched.thetas, fetched.config)
    measured = _measure(fetched, state, ds, eval_tokens, device) if eval_tokens > 0 else None
    info = export_info(fetched.published, source, ds, measured)
    return write_export(out, state, fetched.config, ds.file_path(ds.manifest.tokenizer.name), info, force)


def _fetch(s: ExportSettings) -> tuple[PublishedModel, Any, str, Optional[BucketObjects]]:
    if bool(s.bridge) == bool(s.s3):
        raise Misconfigured(Exit.USAGE, "give one source: --bridge URL, or --s3 s3://BUCKET/runs/RUN_ID")
    if s.bridge:
        try:
            return published_from_bridge(s.bridge, s.round), ObjectTransfer(), s.bridge, None
        except ModelUnavailable as exc:
            code = Exit.BRIDGE_UNREACHABLE if str(exc).startswith("cannot reach") else Exit.MODEL_UNAVAILABLE
            raise Misconfigured(code, str(exc)) from None
    objects, prefix = _bucket(s)
    try:
        return published_from_bucket(objects, prefix, s.round), objects, s.s3, objects
    except ModelUnavailable as exc:
        text = str(exc)
        code = (Exit.S3_CREDENTIALS if any(w in text for w in ("AccessDenied", "InvalidAccessKeyId",
                                                                 "SignatureDoesNotMatch", "credentials"))
                else Exit.S3_UNREACHABLE if "Could not connect" in text else Exit.MODEL_UNAVAILABLE)
        raise Misconfigured(code, text) from None


@exits_cleanly
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Fetch, verify, stitch and write the published model of a round."""
    s = load_settings(ExportSettings, argv, prog="resbm-export", description=__doc__.split("\n")[0])
    quiet_logs()
    if not s.out:
        raise Misconfigured(Exit.USAGE, "--out is required: the folder to write the model to")
    if s.eval_tokens < 0:
        raise Misconfigured(Exit.USAGE, f"--eval-tokens must be >= 0, got {s.eval_tokens}")
    device = device_of(s.device)
    try:
        check_target(Path(s.out).resolve(), s.force)
    except ExportError as exc:
        raise Misconfigured(Exit.USAGE, str(exc)) from None
    pm, getter, source, objects = _fetch(s)
    print(f"run {pm.run.run_id}: the model after round {pm.round} (latest published: {pm.latest}), "
          f"{len(pm.stages)} stages, sync {pm.run.sync_mode}; {download_bytes(pm) / 1e6:.1f} MB to fetch and verify",
          file=sys.stderr)
    try:
        with progress_bar(download_bytes(pm), "download", "B") as bar:
            getter.on_bytes = bar.update
            fetched = fetch_weights(getter, pm)
        ds = run_dataset(pm, s.bridge, objects)
        folder = write_model(fetched, ds, s.out, source, s.force, s.eval_tokens, device)
    except ModelUnavailable as exc:
        raise Misconfigured(Exit.MODEL_UNAVAILABLE, f"round {pm.round} cannot be exported: {exc}") from None
    except DataError as exc:
        raise Misconfigured(Exit.MODEL_UNAVAILABLE, f"the run's dataset (for its tokenizer) is unreadable: {exc}") from None
    except ExportError as exc:
        raise Misconfigured(Exit.USAGE, str(exc)) from None
    print(f"wrote {folder} (every stage matches the hash its replicas voted for)")
    print(f"next: resbm-generate --model {s.out} --prompt \"...\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data loader throughput: sustained tokens/s of `Dataset.batch` from a cold and a warm shard cache,
against what the standard training config consumes.

The dataset folder is served over HTTP on 127.0.0.1 (as a bucket or the bridge would serve it);
"cold" starts from an empty cache, so every shard is fetched, verified and memory-mapped on the
way (prefetch on), "warm" repeats the same samples with every shard cached and verified. Samples
are read as a miner reads them: one (batch, seq) batch per sample id, ids in order.

    python scripts/bench_data.py --data data/bench32k --consumer-json runs/t/resbm-...json
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spec.dataset import DatasetRef, parse_manifest  # noqa: E402
from resbm.dataset import Dataset  # noqa: E402
from neurons.dataset_http import HttpSource  # noqa: E402
from resbm.dataset_store import ShardCache  # noqa: E402

__all__ = ["main", "measure", "serve_folder"]

log = logging.getLogger("bench_data")

H100_STANDARD_STEP_MS = 62.4
"""docs/BENCHMARKS.md: the standard config (default boundary) on an H100, 32 x 512 tokens a step."""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D401 - silence per-request logs
        pass


def serve_folder(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A background HTTP server for `root` on 127.0.0.1; returns (server, base URL)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


def measure(ds: Dataset, samples: int, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """Read `samples` consecutive sample ids; returns tokens/s and seconds."""
    t0 = time.perf_counter()
    for sid in range(samples):
        tokens, _ = ds.batch(seed, sid, batch_size, seq_len)
    dt = time.perf_counter() - t0
    return {"samples": samples, "seconds": dt, "tokens_per_s": samples * batch_size * seq_len / dt}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="a dataset folder (manifest.json + shards)")
    p.add_argument("--samples", type=int, default=2000, help="sample ids read per measurement")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per sample (standard: 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (standard: 512)")
    p.add_argument("--cache-gb", type=float, default=20.0, help="cache size bound")
    p.add_argument("--consumer-json", type=Path, default=None,
                   help="a bench_compression result whose step time sets the consumption (else --step-ms)")
    p.add_argument("--step-ms", type=float, default=H100_STANDARD_STEP_MS, help="training step time, ms")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Entry point: prints the table and returns its rows."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    raw = (args.data / "manifest.json").read_bytes() if (args.data / "manifest.json").is_file() else None
    if raw is None:
        raise SystemExit(f"no manifest.json in {args.data}: build one with scripts/prepare_dataset.py")
    manifest = parse_manifest(raw)
    step_ms, consumer = args.step_ms, "given step time"
    if args.consumer_json:
        rec = json.loads(args.consumer_json.read_text())
        step_ms, consumer = rec["step_ms"], f"{rec['name']} on {rec['device']}"
    need = args.batch_size * args.seq_len / (step_ms / 1000)
    srv, base = serve_folder(args.data)
    ref = DatasetRef(manifest=base + "manifest.json", sha256=hashlib.sha256(raw).hexdigest())
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = ShardCache(tmp, int(args.cache_gb * 1e9))
            ds = Dataset(manifest, HttpSource(base), cache, ref.manifest)
            cold = measure(ds, args.samples, args.batch_size, args.seq_len)
            cold["fetched_mb"] = cache.fetched_bytes / 1e6
            warm_ds = Dataset(manifest, HttpSource(base), cache, ref.manifest)  # new process view: re-verifies
            warm = measure(warm_ds, args.samples, args.batch_size, args.seq_len)
            hot = measure(warm_ds, args.samples, args.batch_size, args.seq_len)
    finally:
        srv.shutdown()
    print(f"dataset {manifest.name}: {len(manifest.shards)} shards, vocab {manifest.vocab_size}; "
          f"batch {args.batch_size} x {args.seq_len}; consumption {need:,.0f} tokens/s ({consumer}, "
          f"{step_ms:.1f} ms/step)")
    print("| cache | samples | seconds | tokens/s | x consumption |")
    print("|---|---|---|---|---|")
    for label, r in (("cold (fetch + verify + map)", cold), ("warm (cached, verify on open)", warm),
                     ("warm (maps open)", hot)):
        r["label"], r["x_consumption"] = label, r["tokens_per_s"] / need
        rows.append(r)
        print(f"| {label} | {r['samples']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | {r['x_consumption']:.0f}x |")
    return rows


if __name__ == "__main__":
    main()

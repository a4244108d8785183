"""The miner's object path against boto3's transfer manager, on the same S3 server in the same run.

    python scripts/bench_transfer.py                        # 256 KiB and 256 MiB, rclone serve s3 on loopback
    python scripts/bench_transfer.py --sizes 262144,1073741824 --repeats 3

"Ours" is what a miner runs: `neurons.transfer.ObjectTransfer.put` to a presigned PUT URL and
`get` from a presigned GET URL, both signed by the bridge's `bridge.storage.Storage`. The baseline
is boto3's `upload_fileobj` / `download_fileobj` with its default `TransferConfig` (multipart and
ranged GETs in parallel above 8 MiB) against the same bucket. Each repeat runs every contestant
once, in turn, so a load change on the machine hits them alike; the table prints the median MiB/s,
the spread (min..max) and ours over boto3 (target >= 0.80).
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Every option of the benchmark."""
    p = argparse.ArgumentParser(prog="bench_transfer", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default=f"{256 << 10},{256 << 20}", help="object sizes in bytes, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="rounds of every contestant per size (objects of "
                   "1 MiB or less: 20x as many)")
    p.add_argument("--s3-endpoint", default="", help="an S3 endpoint to use instead of starting rclone")
    p.add_argument("--s3-access-key", default="")
    p.add_argument("--s3-secret-key", default="")
    p.add_argument("--bucket", default="bench-transfer")
    return p


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _row(size: int, op: str, who: str, seconds: list[float]) -> dict:
    rates = sorted(size / s / 2**20 for s in seconds)
    return {"size": size, "op": op, "who": who, "median": statistics.median(rates), "min": rates[0],
            "max": rates[-1], "n": len(rates)}


def run(endpoint: str, keys: tuple[str, str], bucket: str, sizes: list[int], repeats: int) -> list[dict]:
    """Every (size, op, contestant) row; objects are deleted afterwards."""
    from boto3.s3.transfer import TransferConfig

    from bridge.storage import Storage
    from neurons.transfer import ObjectTransfer
    store = Storage(endpoint, bucket, *keys)
    tm = TransferConfig()  # boto3's defaults: what "the transfer manager" means here
    tr = ObjectTransfer()
    rows = []
    try:
        for size in sizes:
            data = os.urandom(size)
            n = repeats * (20 if size <= 1 << 20 else 1)
            times: dict[tuple[str, str], list[float]] = {}
            for i in range(n):
                key = f"bench/{size}/{i}"
                times.setdefault(("PUT", "boto3"), []).append(_time(
                    lambda: store.client.upload_fileobj(io.BytesIO(data), bucket, key + "/boto3", Config=tm)))
                times.setdefault(("GET", "boto3"), []).append(_time(
                    lambda: store.client.download_fileobj(bucket, key + "/boto3", io.BytesIO(), Config=tm)))
                url = store.presign_put(key + "/ours", size, 600)
                times.setdefault(("PUT", "ours"), []).append(_time(lambda: tr.put(url, data)))
                url = store.presign_get(key + "/ours", 600)
                got: list[bytes] = []
                times.setdefault(("GET", "ours"), []).append(_time(lambda: got.append(tr.get(url, size))))
                if got[0] != data:
                    raise SystemExit(f"ours: GET of {size} bytes returned other bytes")
            rows += [_row(size, op, who, t) for (op, who), t in times.items()]
            store.delete_prefix(f"bench/{size}/")
    finally:
        tr.close()
    return rows


def print_table(rows: list[dict]) -> None:
    """The table: MiB/s per size, op and contestant, ours over boto3."""
    base = {(r["size"], r["op"]): r["median"] for r in rows if r["who"] == "boto3"}
    print(f"{'size':>10} {'op':>4} {'who':>9} {'MiB/s median':>13} {'min..max':>15} {'n':>4} {'vs boto3':>9}")
    for r in sorted(rows, key=lambda r: (r["size"], r["op"], r["who"] != "boto3", r["who"])):
        size = f"{r['size'] / 2**20:g} MiB" if r["size"] >= 1 << 20 else f"{r['size'] >> 10} KiB"
        ratio = "" if r["who"] == "boto3" else f"{r['median'] / base[(r['size'], r['op'])]:.2f}"
        print(f"{size:>10} {r['op']:>4} {r['who']:>9} {r['median']:>13.1f} "
              f"{r['min']:>7.1f}..{r['max']:<7.1f} {r['n']:>4} {ratio:>9}")


def main(argv=None) -> int:
    """Start rclone (unless an endpoint is given), run, print the table."""
    args = build_parser().parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    s3, tmp = None, None
    if args.s3_endpoint:
        endpoint, keys = args.s3_endpoint, (args.s3_access_key, args.s3_secret_key)
    else:
        from scripts.local_servers import start_s3
        tmp = tempfile.mkdtemp(prefix="bench-transfer-")
        s3 = start_s3(Path(tmp) / "s3")
        endpoint, keys = s3.endpoint, (s3.access_key, s3.secret_key)
    try:
        print(f"S3 at {endpoint}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
              flush=True)
        rows = run(endpoint, keys, args.bucket, sizes, args.repeats)
        print_table(rows)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        if s3 is not None:
            s3.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the bridge's hot path (lease + done) over loopback with many simulated miners.

Starts a LocalChain and a real `python -m bridge` process (uvicorn, SQLite, signed requests),
then drives it from asyncio with N miners spread over S stages. Object uploads are skipped:
the bridge runs with `--no-head-check` and no S3 endpoint, so URLs are placeholders and the
HEAD at hops/done is not made; everything else (auth, nonce store, state machine, SQLite
transaction per request) is the production path.

    .venv/bin/python scripts/bench_bridge.py --miners 256 --stages 8 --seconds 20
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from protocol.auth import sign_headers  # noqa: E402
from tests.servers import make_chain, start_bridge, tiny_run_config  # noqa: E402

SHA = hashlib.sha256(b"bench").hexdigest()
args_max_hops = 2
args_poll = 0.05  # seconds an idle miner waits before leasing again (set by --poll)


class Stats:
    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = {"lease": [], "done": [], "step": []}
        self.handoffs = 0
        self.errors = 0


class Conn:
    """A minimal keep-alive HTTP/1.1 client: httpx's async client costs more CPU per request
    than the bridge does, and on 2 cores the benchmark must not measure its own client."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def post(self, path: str, content: bytes, headers: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write((f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\n{head}"
                           f"content-length: {len(content)}\r\n\r\n").encode() + content)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return status, await self.reader.readexactly(length)


async def call(http: Conn, kp, receiver: str, path: str, body: dict) -> dict:
    content = json.dumps(body, separators=(",", ":")).encode()
    headers = sign_headers(kp, "POST", path, content, receiver)
    headers["content-type"] = "application/json"
    status, data = await http.post(path, content, headers)
    if status >= 400:
        raise RuntimeError(f"{path}: {status} {data[:200]!r}")
    return json.loads(data)


async def miner(http, kp, receiver, stats: Stats, end: float, stages: int, s: int) -> None:
    req = {"max_hops": args_max_hops, "fwd_out_bytes": 256 if s < stages - 1 else 0,
           "bwd_out_bytes": 256 if s > 0 else 0}
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            r = await call(http, kp, receiver, "/v1/hops/lease", req)
        except RuntimeError:
            stats.errors += 1
            await asyncio.sleep(0.05)
            continue
        stats.lat["lease"].append(time.perf_counter() - t0)
        if r["action"] == "work":
            for hop in r["hops"]:
                t1 = time.perf_counter()
                out = hop["output"]
                body = {"hop_id": hop["hop_id"], "size": out["size"] if out else 0,
                        "sha256": SHA if out else None}
                await call(http, kp, receiver, "/v1/hops/done", body)
                stats.lat["done"].append(time.perf_counter() - t1)
                stats.handoffs += 1
        elif r["action"] == "step":
            t1 = time.perf_counter()
            await call(http, kp, receiver, "/v1/steps/done", {
                "round": r["round"], "inner_step": r["inner_step"], "samples": r["step_samples"]})
            stats.lat["step"].append(time.perf_counter() - t1)
        else:
            await asyncio.sleep(min(args_poll, r["retry_after"] or args_poll))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def drive(bridge, keys, seconds: float, stages: int) -> tuple[Stats, float]:
    stats = Stats()
    host, port = bridge.url.split("//")[1].split(":")
    conns = [Conn(host, int(port)) for _ in keys]
    stage_of = [(await call(c, k, bridge.hotkey, "/v1/miners/register", {}))["stage"]
                for c, k in zip(conns, keys)]  # the last one mints round 0's samples (not timed)
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    await asyncio.gather(*(miner(c, k, bridge.hotkey, stats, end, stages, s)
                           for c, k, s in zip(conns, keys, stage_of)))
    return stats, time.monotonic() - t0


def main() -> None:
    """Run the benchmark and print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--miners", type=int, default=256, help="simulated miners")
    p.add_argument("--stages", type=int, default=8, help="pipeline stages")
    p.add_argument("--seconds", type=float, default=20.0, help="measurement length")
    p.add_argument("--samples", type=int, default=20_000, help="samples in the round")
    p.add_argument("--micro-batches", type=int, default=8, help="A: forwards per inner step")
    p.add_argument("--poll", type=float, default=0.05, help="idle miner re-lease interval (s)")
    p.add_argument("--max-hops", type=int, default=2, help="hops per lease")
    args = p.parse_args()
    global args_poll, args_max_hops
    args_poll, args_max_hops = args.poll, args.max_hops
    work = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    _, keys = make_chain(work / "chain.db", miners=args.miners, validators=0)
    cfg = tiny_run_config(n_stages=args.stages, samples_per_round=args.samples, total_rounds=1,
                          micro_batches_per_step=args.micro_batches, run_id="bench",
                          lease_seconds=60.0)
    bridge = start_bridge(work, cfg, work / "chain.db", None,
                          extra=("--no-head-check", "--rate", "1000", "--log-level", "WARNING"))
    try:
        stats, wall = asyncio.run(drive(bridge, keys["miners"], args.seconds, args.stages))
    finally:
        bridge.stop()
    con = sqlite3.connect(bridge.db)
    rows = sum(con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
               for t in ("hops", "samples", "miners"))
    con.close()
    tx = len(stats.lat["lease"]) + len(stats.lat["done"]) + len(stats.lat["step"])
    print(f"bridge benchmark: {args.miners} miners, {args.stages} stages, {wall:.1f} s, "
          f"cpu count {os.cpu_count()}, objects not uploaded (--no-head-check)")
    print(f"{'metric':<32}{'value':>12}")
    print(f"{'hand-offs/s (lease + done)':<32}{stats.handoffs / wall:>12.0f}")
    for k in ("lease", "done"):
        print(f"{k + ' p50 ms':<32}{pct(stats.lat[k], 0.5):>12.2f}")
        print(f"{k + ' p99 ms':<32}{pct(stats.lat[k], 0.99):>12.2f}")
    print(f"{'requests/s':<32}{tx / wall:>12.0f}")
    print(f"{'SQLite transactions/s':<32}{tx / wall:>12.0f}")
    print(f"{'SQLite rows in DB (hops+samples)':<32}{rows:>12d}")
    print(f"{'errors':<32}{stats.errors:>12d}")


if __name__ == "__main__":
    main()

"""Benchmark the bridge's hot path (lease + done) over loopback with many simulated miners.

Starts a LocalChain and a real `python -m bridge` process (uvicorn, SQLite, signed requests),
then drives it from asyncio with N miners spread over S stages. Idle miners long-poll the
lease (`wait_ms`, `--wait-ms 0` for the old immediate `wait`); `--compute-ms` makes each
hop take that long on its miner. By default object uploads are skipped: the bridge runs with
`--no-head-check` and no S3 endpoint, so URLs are placeholders and no object is sealed at
hops/done; everything else (auth, nonce store, state machine, SQLite group commits) is the
production path. `--s3` starts rclone's S3 server too: every miner uploads its output with the
presigned PUT and the bridge seals it (server-side copy) at hops/done. Bridge CPU comes from
/proc, SQLite counts from GET /v1/metrics. Output sizes are the run's exact code size.

    .venv/bin/python scripts/bench_bridge.py --miners 256 --stages 8 --seconds 20
    .venv/bin/python scripts/bench_bridge.py --miners 64 --stages 4 --seconds 20 --s3
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from protocol.auth import sign_headers  # noqa: E402
from scripts.local_bridge import code_bytes, make_chain, start_bridge, tiny_run_config  # noqa: E402
from scripts.local_servers import start_s3  # noqa: E402
from protocol.routes import route  # noqa: E402

args_max_hops = 2
args_poll = 0.05  # seconds an idle miner waits before leasing again (set by --poll)
args_wait_ms = 2000  # lease long-poll (set by --wait-ms)
args_compute = 0.0  # seconds a simulated miner "computes" per hop (set by --compute-ms)
args_code = 0  # bytes of one hop output (the run's code size)


class Stats:
    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = {"lease": [], "done": [], "step": []}
        self.handoff_lat: list[float] = []  # previous hop's done acked -> next hop leased
        self.ready: dict[int, float] = {}   # sample id -> when its last hop's done was acked
        self.handoffs = 0
        self.idle = 0
        self.errors = 0


class Conn:
    """A minimal keep-alive HTTP/1.1 client: httpx's async client costs more CPU per request
    than the bridge does, and on 2 cores the benchmark must not measure its own client."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def post(self, path: str, content: bytes, headers: dict,
                   method: str = "POST") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write((f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n{head}"
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


async def upload(s3: Conn, url: str, data: bytes) -> None:
    """PUT `data` to a presigned URL over a kept-alive connection."""
    target = url.split("//", 1)[1].split("/", 1)[1]
    status, body = await s3.post("/" + target, data, {}, method="PUT")
    if status != 200:
        raise RuntimeError(f"PUT: {status} {body[:200]!r}")


async def miner(http, kp, receiver, stats: Stats, end: float, stages: int, s: int,
                s3: Optional[Conn] = None) -> None:
    req = {"max_hops": args_max_hops, "fwd_out_bytes": args_code if s < stages - 1 else 0,
           "bwd_out_bytes": args_code if s > 0 else 0}
    data = os.urandom(args_code)
    sha = hashlib.sha256(data).hexdigest()
    if args_wait_ms:
        req["wait_ms"] = args_wait_ms
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            r = await call(http, kp, receiver, route("lease").path, req)
        except RuntimeError:
            stats.errors += 1
            await asyncio.sleep(0.05)
            continue
        t_lease = time.perf_counter()
        if r["action"] == "work":
            stats.lat["lease"].append(t_lease - t0)
            for hop in r["hops"]:
                if hop["sample_id"] in stats.ready:
                    stats.handoff_lat.append(t_lease - stats.ready.pop(hop["sample_id"]))
                if args_compute:
                    await asyncio.sleep(args_compute)
                t1 = time.perf_counter()
                out = hop["output"]
                if out and s3 is not None:
                    await upload(s3, out["put_url"], data)
                body = {"hop_id": hop["hop_id"], "size": out["size"] if out else 0,
                        "sha256": sha if out else None}
                await call(http, kp, receiver, route("hop_done").path, body)
                t2 = time.perf_counter()
                stats.lat["done"].append(t2 - t1)
                stats.ready[hop["sample_id"]] = t2
                stats.handoffs += 1
        elif r["action"] == "step":
            t1 = time.perf_counter()
            await call(http, kp, receiver, route("step_done").path, {
                "round": r["round"], "inner_step": r["inner_step"], "samples": r["step_samples"]})
            stats.lat["step"].append(time.perf_counter() - t1)
        else:
            stats.idle += 1
            if r["action"] != "wait" or not args_wait_ms:
                await asyncio.sleep(min(args_poll, r["retry_after"] or args_poll))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(bridge, keys, seconds: float, stages: int,
                s3_url: Optional[str] = None) -> tuple[Stats, float, dict]:
    stats = Stats()
    host, port = bridge.url.split("//")[1].split(":")
    conns = [Conn(host, int(port)) for _ in keys]
    s3s: list = [None] * len(keys)
    if s3_url:
        h3, p3 = s3_url.split("//")[1].split(":")
        s3s = [Conn(h3, int(p3)) for _ in keys]
    stage_of = [(await call(c, k, bridge.hotkey, route("register").path, {}))["stage"]
                for c, k in zip(conns, keys)]  # the last one mints round 0's samples (not timed)
    m0 = await metrics(conns[0], keys[0], bridge.hotkey)
    cpu0, me0 = cpu_seconds(bridge.proc.pid), time.process_time()
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    await asyncio.gather(*(miner(c, k, bridge.hotkey, stats, end, stages, s, s3)
                           for c, k, s, s3 in zip(conns, keys, stage_of, s3s)))
    wall = time.monotonic() - t0
    cpu = {"bridge": cpu_seconds(bridge.proc.pid) - cpu0, "client": time.process_time() - me0}
    m1 = await metrics(conns[0], keys[0], bridge.hotkey)
    db = {k: m1.get(k, 0) - m0.get(k, 0) for k in ("db_commits", "db_rows_written")}
    db.update(cpu)
    return stats, wall, db


async def metrics(http: Conn, kp, receiver: str) -> dict:
    """GET /v1/metrics over the same minimal client."""
    path = route("metrics").path
    headers = sign_headers(kp, "GET", path, b"", receiver)
    http.writer.write((f"GET {path} HTTP/1.1\r\nhost: {http.host}\r\n"
                       + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                       + "\r\n").encode())
    await http.reader.readline()
    length = 0
    while (line := await http.reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return json.loads(await http.reader.readexactly(length))


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
    p.add_argument("--wait-ms", type=int, default=2000,
                   help="lease long-poll; 0: immediate `wait` and client-side polling")
    p.add_argument("--compute-ms", type=float, default=0.0,
                   help="simulated compute per hop (0: miners hand work on at once)")
    p.add_argument("--s3", action="store_true",
                   help="real rclone S3: miners upload outputs, the bridge seals them at done")
    args = p.parse_args()
    global args_poll, args_max_hops, args_wait_ms, args_compute, args_code
    args_poll, args_max_hops, args_wait_ms = args.poll, args.max_hops, args.wait_ms
    args_compute = args.compute_ms / 1000.0
    work = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    _, keys = make_chain(work / "chain.db", miners=args.miners, validators=0)
    cfg = tiny_run_config(n_stages=args.stages, samples_per_round=args.samples, total_rounds=1,
                          micro_batches_per_step=args.micro_batches, run_id="bench",
                          lease_seconds=60.0)
    args_code = code_bytes(cfg)
    s3 = start_s3(work / "s3") if args.s3 else None
    flags = ("--rate", "1000", "--log-level", "WARNING")
    bridge = start_bridge(work, cfg, work / "chain.db", s3,
                          extra=flags if s3 else ("--no-head-check", *flags))
    try:
        stats, wall, db = asyncio.run(drive(bridge, keys["miners"], args.seconds, args.stages,
                                            s3.endpoint if s3 else None))
    finally:
        bridge.stop()
        if s3 is not None:
            s3.stop()
    tx = len(stats.lat["lease"]) + stats.idle + len(stats.lat["done"]) + len(stats.lat["step"])
    print(f"bridge benchmark: {args.miners} miners, {args.stages} stages, {wall:.1f} s, "
          f"cpu count {os.cpu_count()}, lease wait_ms {args.wait_ms}, max_hops {args.max_hops}, "
          f"compute {args.compute_ms:g} ms/hop, {args_code}-byte outputs, "
          + ("uploaded to rclone S3 and sealed at done" if args.s3
             else "objects not uploaded (--no-head-check)"))
    rows = [("hand-offs/s (lease + done)", stats.handoffs / wall, "{:.0f}")]
    for k, xs in (("done", stats.lat["done"]), ("lease with work (incl. hold)", stats.lat["lease"]),
                  ("hand-off (done ack -> next lease)", stats.handoff_lat)):
        rows += [(f"{k} p50 ms", pct(xs, 0.5), "{:.2f}"), (f"{k} p99 ms", pct(xs, 0.99), "{:.2f}")]
    rows += [("requests/s", tx / wall, "{:.0f}"),
             ("idle lease answers/s", stats.idle / wall, "{:.0f}"),
             ("SQLite commits/s", db["db_commits"] / wall, "{:.0f}"),
             ("SQLite rows written/s", db["db_rows_written"] / wall, "{:.0f}"),
             ("bridge CPU % of one core", 100 * db["bridge"] / wall, "{:.0f}"),
             ("bridge CPU ms per request", 1000 * db["bridge"] / max(tx, 1), "{:.3f}"),
             ("bridge CPU ms per hand-off", 1000 * db["bridge"] / max(stats.handoffs, 1), "{:.3f}"),
             ("client CPU ms per request", 1000 * db["client"] / max(tx, 1), "{:.3f}"),
             ("errors", stats.errors, "{:d}")]
    print(f"{'metric':<40}{'value':>12}")
    for name, val, fmt in rows:
        print(f"{name:<40}{fmt.format(val):>12}")

if __name__ == "__main__":
    main()

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

With `--db` the same load is measured three times in one run: SQLite with one bridge process,
PostgreSQL with one, and PostgreSQL with `--bridges N` processes (miner i talks to bridge
i % N); bridge CPU is summed over the bridge processes, and with `--db local` the PostgreSQL
server's CPU is shown too. One column per configuration.

    .venv/bin/python scripts/bench_bridge.py --miners 256 --stages 8 --seconds 20
    .venv/bin/python scripts/bench_bridge.py --miners 64 --stages 4 --seconds 20 --s3
    .venv/bin/python scripts/bench_bridge.py --miners 64 --stages 4 --seconds 20 --s3 --db local --bridges 2
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
from scripts.local_bridge import (code_bytes, make_chain, start_bridge, start_bridges,  # noqa: E402
                                  tiny_run_config)
from scripts.local_postgres import fresh_database  # noqa: E402
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


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU time of a process and its direct children (a PostgreSQL server and its backends)."""
    total = cpu_seconds(root_pid)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == root_pid:
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
    return total


async def drive(bridges, keys, seconds: float, stages: int, s3_url: Optional[str] = None,
                db_pid: Optional[int] = None) -> tuple[Stats, float, dict]:
    """Miner i talks to bridge i % len(bridges); CPU is summed over every bridge process."""
    stats = Stats()
    hotkey = bridges[0].hotkey
    conns = []
    for i, _ in enumerate(keys):
        host, port = bridges[i % len(bridges)].url.split("//")[1].split(":")
        conns.append(Conn(host, int(port)))
    s3s: list = [None] * len(keys)
    if s3_url:
        h3, p3 = s3_url.split("//")[1].split(":")
        s3s = [Conn(h3, int(p3)) for _ in keys]
    stage_of = [(await call(c, k, hotkey, route("register").path, {}))["stage"]
                for c, k in zip(conns, keys)]  # the last one mints round 0's samples (not timed)
    firsts = conns[:len(bridges)]  # one connection to each bridge, for its metrics
    m0 = [await metrics(c, k, hotkey) for c, k in zip(firsts, keys)]
    cpu0, me0 = sum(cpu_seconds(b.proc.pid) for b in bridges), time.process_time()
    db0 = tree_cpu_seconds(db_pid) if db_pid else 0.0
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    await asyncio.gather(*(miner(c, k, hotkey, stats, end, stages, s, s3)
                           for c, k, s, s3 in zip(conns, keys, stage_of, s3s)))
    wall = time.monotonic() - t0
    cpu = {"bridge": sum(cpu_seconds(b.proc.pid) for b in bridges) - cpu0,
           "client": time.process_time() - me0,
           "db_server": (tree_cpu_seconds(db_pid) - db0) if db_pid else float("nan")}
    m1 = [await metrics(c, k, hotkey) for c, k in zip(firsts, keys)]
    db = {k: sum(b.get(k, 0) - a.get(k, 0) for a, b in zip(m0, m1))
          for k in ("db_commits", "db_rows_written")}
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


def measure(label: str, args, work: Path, cfg: dict, keys, s3, db_url: Optional[str],
            n_bridges: int, db_pid: Optional[int]) -> dict:
    """Start `n_bridges` bridges on `db_url` (None: SQLite), drive them, stop them: one column."""
    flags = ("--rate", "1000", "--log-level", "WARNING")
    extra = flags if s3 else ("--no-head-check", *flags)
    folder = work / label.replace(" ", "_")
    if db_url is None:
        bridges = [start_bridge(folder, cfg, work / "chain.db", s3, extra=extra)]
    else:
        bridges = start_bridges([folder / f"b{i}" for i in range(n_bridges)], cfg,
                                work / "chain.db", s3, db_url, extra=extra)
    try:
        stats, wall, db = asyncio.run(drive(bridges, keys["miners"], args.seconds, args.stages,
                                            s3.endpoint if s3 else None, db_pid))
    finally:
        for b in bridges:
            b.stop()
    tx = len(stats.lat["lease"]) + stats.idle + len(stats.lat["done"]) + len(stats.lat["step"])
    hand = max(stats.handoffs, 1)
    col = {"hand-offs/s (lease + done)": (stats.handoffs / wall, "{:.0f}")}
    for k, xs in (("done", stats.lat["done"]), ("lease with work (incl. hold)", stats.lat["lease"]),
                  ("hand-off (done ack -> next lease)", stats.handoff_lat)):
        col[f"{k} p50 ms"] = (pct(xs, 0.5), "{:.2f}")
        col[f"{k} p99 ms"] = (pct(xs, 0.99), "{:.2f}")
    col.update({
        "requests/s": (tx / wall, "{:.0f}"),
        "idle lease answers/s": (stats.idle / wall, "{:.0f}"),
        "DB commits/s (all bridges)": (db["db_commits"] / wall, "{:.0f}"),
        "DB rows written/s": (db["db_rows_written"] / wall, "{:.0f}"),
        "bridge CPU % of one core (all)": (100 * db["bridge"] / wall, "{:.0f}"),
        "bridge CPU ms per request": (1000 * db["bridge"] / max(tx, 1), "{:.3f}"),
        "bridge CPU ms per hand-off": (1000 * db["bridge"] / hand, "{:.3f}"),
        "PostgreSQL server CPU ms per hand-off": (1000 * db["db_server"] / hand, "{:.3f}"),
        "client CPU ms per request": (1000 * db["client"] / max(tx, 1), "{:.3f}"),
        "errors": (stats.errors, "{:d}"),
    })
    return col


def main() -> None:
    """Run the benchmark for each configuration and print one table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--miners", type=int, default=256, help="simulated miners")
    p.add_argument("--stages", type=int, default=8, help="pipeline stages")
    p.add_argument("--seconds", type=float, default=20.0, help="measurement length per configuration")
    p.add_argument("--samples", type=int, default=20_000, help="samples in the round")
    p.add_argument("--micro-batches", type=int, default=8, help="A: forwards per inner step")
    p.add_argument("--poll", type=float, default=0.05, help="idle miner re-lease interval (s)")
    p.add_argument("--max-hops", type=int, default=2, help="hops per lease")
    p.add_argument("--wait-ms", type=int, default=2000,
                   help="lease long-poll; 0: immediate `wait` and client-side polling")
    p.add_argument("--compute-ms", type=float, default=0.0,
                   help="simulated compute per hop (0: miners hand work on at once)")
    p.add_argument("--s3", action="store_true",
                   help="real rclone S3: miners upload outputs, the bridge seals them at done "
                        "(the production path; without it the bridge runs --no-head-check)")
    p.add_argument("--db", default="",
                   help="also measure PostgreSQL: a postgresql:// URL whose user may CREATE "
                        "DATABASE (one fresh database per configuration), or 'local' for a "
                        "throwaway cluster started here (fsync on)")
    p.add_argument("--bridges", type=int, default=2,
                   help="bridge processes of the multi-process PostgreSQL configuration")
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
    pg, db_pid = None, None
    if args.db == "local":
        from scripts.local_postgres import start_postgres
        pg = start_postgres(fsync=True)
        db_pid = int((pg.root / "data" / "postmaster.pid").read_text().split()[0])
    plan: list[tuple[str, Optional[str], int]] = [("SQLite x1", None, 1)]
    if args.db:
        plan += [("PostgreSQL x1", "", 1), (f"PostgreSQL x{args.bridges}", "", args.bridges)]
    cols = {}
    try:
        for k, (label, url, n) in enumerate(plan):
            if url is not None:
                url = fresh_database(pg.url() if pg else args.db, f"bench{os.getpid()}_{k}")
            cols[label] = measure(label, args, work, cfg, keys, s3, url, n, db_pid if url else None)
    finally:
        if s3 is not None:
            s3.stop()
        if pg is not None:
            pg.stop()
    print(f"bridge benchmark: {args.miners} miners, {args.stages} stages, {args.seconds:g} s per "
          f"configuration, cpu count {os.cpu_count()}, lease wait_ms {args.wait_ms}, max_hops "
          f"{args.max_hops}, compute {args.compute_ms:g} ms/hop, {args_code}-byte outputs, "
          + ("uploaded to rclone S3 and sealed at done (production path)" if args.s3
             else "objects not uploaded (--no-head-check: bench-only, trusts miners)")
          + (f"; PostgreSQL {'throwaway cluster, fsync on' if pg else 'at --db'}" if args.db else ""))
    names = list(next(iter(cols.values())))
    print(f"{'metric':<42}" + "".join(f"{c:>16}" for c in cols))
    for name in names:
        print(f"{name:<42}" + "".join(f"{fmt.format(col[name][0]):>16}"
                                      for col in cols.values() for fmt in [col[name][1]]))


if __name__ == "__main__":
    main()

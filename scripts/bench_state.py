"""Benchmark the bridge's state machine and its SQLite commits in process (no HTTP, no auth).

Drives honest miners through lease -> done -> step transitions with `BridgeService.apply` (one
commit per transition, the slowest path) on a real SQLite file, and prints transitions/s and rows
written. `--baseline DIR` runs the same workload against another checkout (say, the main branch)
in a subprocess, seed by seed, and prints the ratio, so both sides share the machine's load.

    .venv/bin/python scripts/bench_state.py --baseline /work/main
    .venv/bin/python scripts/bench_state.py --db local   # and the same on PostgreSQL

`--db` (a postgresql:// URL whose user may create databases, or `local` for a throwaway
cluster with fsync on) adds a PostgreSQL side: one transaction per transition, one process,
so its transitions/s is what the run's lock can pass when nothing is batched.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run_once"]

HERE = Path(__file__).resolve().parent.parent


def run_once(seed: int, transitions: int, stages: int, miners: int,
             db_url: str = "") -> dict[str, float]:
    """Apply about `transitions` transitions; returns their rate (per wall and per CPU second:
    the CPU rate is the steadier one on a shared machine) and the rows written."""
    from bridge import state
    from bridge.db import Database, open_database
    from bridge.records import Tunables
    from bridge.service import BridgeService
    from protocol.messages import RunConfig

    run = RunConfig(run_id="bench", model={}, n_stages=stages, batch_size=1,
                    micro_batches_per_step=4, inner_steps_per_round=1000,
                    samples_per_round=100_000, muon_lr=0.02, adamw_lr=0.003, total_rounds=1,
                    data_seed=1, init_seed=2, lease_seconds=600.0, max_attempts=3,
                    max_object_bytes=4096, merge_timeout_seconds=60.0)
    now = [0.0]
    with tempfile.TemporaryDirectory() as d:
        db = open_database(db_url) if db_url else Database(Path(d) / "bench.db")
        svc = BridgeService(run, db, None, Tunables(), seed=seed, clock=lambda: now[0])
        hks = [f"m{i}" for i in range(miners)]
        rng = random.Random(seed)
        for hk in hks:
            svc.apply(state.register, hk)
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while n < transitions:
            now[0] += 0.01
            hk = rng.choice(hks)
            action, hops, _ = svc.apply(state.lease, hk, 2, 100, 100)
            n += 1
            for h in hops:
                svc.apply(state.complete, hk, h.hop_id, "ab" * 32 if h.out_key else None,
                          h.out_size, 1.0)
                n += 1
            if action == "step":
                m = svc.read(lambda st: st.miners[hk])
                svc.apply(lambda st, t, r: state.step_done(st, hk, st.round, m.inner_step,
                                                           m.step_samples, t))
                n += 1
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        writes = db.writes
        db.close()
    return {"transitions": n, "seconds": dt, "per_s": n / dt, "per_cpu_s": n / cpu,
            "rows": writes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transitions", type=int, default=6000)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--miners", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--baseline", default=None, help="another checkout to compare against")
    p.add_argument("--db", default="", help="also PostgreSQL: a postgresql:// URL or 'local'")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # subprocess mode
    p.add_argument("--db-url", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(run_once(a.one, a.transitions, a.stages, a.miners, a.db_url)))
        return
    sides = [("this checkout", str(HERE), "")]
    sides += [("baseline", a.baseline, "")] if a.baseline else []
    sides += [("postgresql", str(HERE), "pg")] if a.db else []
    args = ["--transitions", str(a.transitions), "--stages", str(a.stages),
            "--miners", str(a.miners)]
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    server = None
    if a.db == "local":
        sys.path.insert(0, str(HERE))
        from scripts.local_postgres import start_postgres
        server = start_postgres(fsync=True)
    try:
        for seed in range(a.seeds):
            for name, repo, kind in sides:  # interleaved: every side sees the same load
                env = dict(os.environ, PYTHONPATH=repo)
                extra = ["--db-url", _fresh(server.url() if server else a.db, seed)] if kind else []
                out = subprocess.run([sys.executable, __file__, "--one", str(seed), *args, *extra],
                                     env=env, cwd=repo, capture_output=True, text=True,
                                     check=True).stdout
                rows[name].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        if server is not None:
            server.stop()
    print(f"{'side':<14} {'seed':>4} {'transitions':>11} {'per_s':>9} {'per_cpu_s':>9} {'rows':>7}")
    for name, _, _ in sides:
        for seed, r in enumerate(rows[name]):
            print(f"{name:<14} {seed:>4} {r['transitions']:>11} {r['per_s']:>9.0f} "
                  f"{r['per_cpu_s']:>9.0f} {r['rows']:>7}")
    if a.baseline:
        for key in ("per_s", "per_cpu_s"):
            ratios = [x[key] / y[key] for x, y in zip(rows["this checkout"], rows["baseline"])]
            print(f"{key} ratio this/baseline per seed: " + " ".join(f"{x:.3f}" for x in ratios))


def _fresh(url: str, seed: int) -> str:
    sys.path.insert(0, str(HERE))
    from scripts.local_postgres import fresh_database
    return fresh_database(url, f"bench_state_{os.getpid()}_{seed}")


if __name__ == "__main__":
    main()

"""Replica sync benchmark (CPU): bytes, merge wall time and peak RSS per replica per round.

One stage of P parameters and R replicas, over a real rclone S3 server with presigned URLs from the
bridge's signer (bridge.storage.Storage). Each cell runs in a fresh process and measures one focal
replica; the other R - 1 replicas' uploads (and, sharded, the merges of shards the focal replica
does not merge) are made by the same process outside the focal replica's counters.

* today: upload the fp32 pseudo-gradient, download every replica's, merge the whole stage with
  neurons.merge_compute (the code the miners run), upload the merged fp32 state.
* sharded: neurons.shard_sync with the given codecs, shard count and mergers per shard.

    python scripts/bench_sync.py                         # the default grid, ~5 min on 2 cores
    python scripts/bench_sync.py --r 8 --p 4 --modes sharded --codec int2 --merged int4
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["cell", "main"]

CHUNK = 1 << 20  # values per parameter tensor of the synthetic stage


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cell(mode: str, r: int, p_m: int, codec: str, merged: str, shards: int, mergers: int,
         endpoint: str, ak: str, sk: str) -> dict:
    """Run one (mode, R, P) cell in this process; returns its measurements."""
    import hashlib

    import torch

    from bridge.storage import Storage
    from neurons.transfer import ObjectTransfer
    torch.set_num_threads(1)
    storage = Storage(endpoint, "resbm", ak, sk)
    prefix = f"bench{time.time_ns()}"
    n_params = p_m * 2**20
    shapes = {f"w{i:04d}": (min(CHUNK, n_params - i * CHUNK),) for i in range((n_params + CHUNK - 1) // CHUNK)}
    hks = [f"hk{i:03d}" for i in range(r)]
    focal = hks[0]

    def gen(seed: int, a: int, b: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(b - a, generator=g) * 1e-3).float()

    others = ObjectTransfer()
    me = ObjectTransfer()
    if mode == "today":
        from protocol.messages import MergeItem
        from resbm import outer
        from neurons.merge_compute import compute_merge
        from neurons.objects import fetch_items
        from protocol.keys import PseudogradKey, StateKey
        items = []
        for i, h in enumerate(hks[1:], 1):  # the others' whole fp32 pseudo-gradients
            blob = outer.tensors_bytes({n: gen(1000 * i + j, 0, s[0]) for j, (n, s) in enumerate(shapes.items())})
            sha_i = hashlib.sha256(blob).hexdigest()
            key = PseudogradKey(prefix, 0, 0, h, sha_i).final
            others.put(storage.presign_put(key, len(blob), 600), blob)
            items.append((h, key, sha_i))
            del blob
        base_rss = _rss_mb()  # the process before this replica's state exists (clients warm)
        theta = {n: gen(7 + j, 0, s[0]) for j, (n, s) in enumerate(shapes.items())}
        mom = {n: gen(9 + j, 0, s[0]) for j, (n, s) in enumerate(shapes.items())}
        state_rss = _rss_mb()
        t0 = time.perf_counter()
        pg = {n: gen(5 + j, 0, s[0]) for j, (n, s) in enumerate(shapes.items())}
        blob = outer.tensors_bytes(pg)
        del pg
        sha = hashlib.sha256(blob).hexdigest()
        mine_key = PseudogradKey(prefix, 0, 0, focal, sha).final
        me.put(storage.presign_put(mine_key, len(blob), 600), blob)
        del blob
        mi = [MergeItem(hotkey=h, stage=0, key=k, sha256=s, size=1, samples=10, epoch=0,
                        get_url=storage.presign_get(k, 600))
              for h, k, s in [(focal, mine_key, sha)] + items]
        from protocol.messages import RunConfig
        run = RunConfig(run_id="bench-sync", model={}, n_stages=1, batch_size=1, micro_batches_per_step=1,
                        inner_steps_per_round=1, samples_per_round=1, muon_lr=0.02, adamw_lr=3e-3,
                        total_rounds=1, data_seed=0, init_seed=0, outer_momentum=0.5,
                        max_state_bytes=2**40)
        fetched = fetch_items(me, mi, shapes, 2**40)
        out = compute_merge(theta, mom, None, mi, fetched, shapes, run)
        del fetched
        me.put(storage.presign_put(StateKey(prefix, 1, 0, focal, out.sha).final, len(out.blob), 600), out.blob)
        wall = time.perf_counter() - t0
    else:
        from neurons.shard_sync import Piece, ReplicaSync, SyncSettings, pg_key
        from resbm.robust_merge import MergeParams
        from resbm.shards import assign_mergers, layout
        from resbm.sync_codec import Codec, encode
        cfg = SyncSettings(Codec(codec, 256), Codec(merged, 256), shards, mergers, 8,
                           MergeParams(outer_lr=0.7, outer_momentum=0.5))
        lay = layout(shapes, shards, 256)

        class Board:
            def put_url(self, key, size):
                return storage.presign_put(key, size, 600)

            def get_url(self, key):
                return storage.presign_get(key, 600)

        board = Board()
        pieces = []
        for i, h in enumerate(hks[1:], 1):  # the others' pseudo-gradients, shard by shard
            shas = []
            for s, (a, b) in enumerate(lay):
                blob = encode(gen(1000 * i + s, a, b), cfg.pg)
                sh = hashlib.sha256(blob).hexdigest()
                others.put(board.put_url(pg_key(prefix, 0, 0, h, s, sh), len(blob)), blob)
                shas.append(sh)
            pieces.append(Piece(h, 10, tuple(shas)))
        base_rss = _rss_mb()  # the process before this replica's state exists (clients warm)
        theta = {n: gen(7 + j, 0, s[0]) for j, (n, s) in enumerate(shapes.items())}
        mom = {n: gen(9 + j, 0, s[0]) for j, (n, s) in enumerate(shapes.items())}
        state_rss = _rss_mb()
        t0 = time.perf_counter()
        pg = {n: gen(5 + j, 0, s[0]) for j, (n, s) in enumerate(shapes.items())}
        mine = ReplicaSync(me, board, cfg, prefix, focal, 0)
        pieces = [Piece(focal, 10, mine.upload(0, pg, lay))] + pieces
        del pg
        table = assign_mergers(0, 0, hks, len(lay), mergers)
        done = mine.merge(0, table, lay, pieces, [None] * len(lay))
        wall = time.perf_counter() - t0
        helper = ReplicaSync(others, board, cfg, prefix, "other", 0)
        decided = []
        for s, hs in enumerate(table):
            if s in done:
                decided.append(([board.get_url(done[s].key)], done[s].sha))
            else:  # another merger's copy (votes are tested elsewhere; here only bytes matter)
                helper.hotkey = next(h for h in hs if h != focal)
                ms = helper.merge_one(0, s, lay[s], pieces, None)
                decided.append(([board.get_url(ms.key)], ms.sha))
        t1 = time.perf_counter()
        mine.apply(0, theta, mom, lay, decided, done)
        wall += time.perf_counter() - t1
    state_mb = 8 * n_params / 2**20
    return {"mode": mode if mode == "today" else f"{codec}/{merged} S{shards} m{mergers}", "R": r,
            "P_M": p_m, "up_MB": me.stats.bytes_up / 2**20, "down_MB": me.stats.bytes_down / 2**20,
            "fp32_P_MB": 4 * n_params / 2**20, "wall_s": wall, "state_MB": state_mb,
            "peak_over_base_MB": _peak_mb() - base_rss, "held_before_MB": state_rss - base_rss}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the grid (each cell in a fresh process) and print the table."""
    ap = argparse.ArgumentParser(prog="bench_sync", description=__doc__.split("\n\n")[0])
    ap.add_argument("--r", default="2,8,32", help="replica counts")
    ap.add_argument("--p", default="4", help="parameters per stage, in units of 2^20")
    ap.add_argument("--modes", default="today,sharded")
    ap.add_argument("--codec", default="int4")
    ap.add_argument("--merged", default="int8")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--mergers", type=int, default=3)
    ap.add_argument("--today-max-r", type=int, default=32, help="skip 'today' above this R (memory)")
    ap.add_argument("--json", default="")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds dynamic")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(cell(**json.loads(a.one))))
        return []
    from scripts.local_servers import start_s3
    # glibc's dynamic mmap threshold keeps freed multi-MB buffers in the heap, which shows up as
    # RSS that is no longer in use; a fixed threshold measures what the sync really holds
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    if a.glibc_default:
        env = dict(os.environ)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        s3 = start_s3(Path(tmp) / "s3")
        try:
            for p_m in [int(x) for x in a.p.split(",")]:
                for r in [int(x) for x in a.r.split(",")]:
                    for mode in a.modes.split(","):
                        if mode == "today" and r > a.today_max_r:
                            continue
                        args = dict(mode=mode, r=r, p_m=p_m, codec=a.codec, merged=a.merged, shards=a.shards,
                                    mergers=a.mergers, endpoint=s3.endpoint, ak=s3.access_key, sk=s3.secret_key)
                        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(args)],
                                             capture_output=True, text=True, check=False, env=env)
                        if out.returncode:
                            print(out.stderr[-2000:], file=sys.stderr)
                            continue
                        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                        print_row(rows[-1], rows)
        finally:
            s3.stop()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


def print_row(x: dict, rows: list[dict]) -> None:
    """One table line (the header before the first)."""
    if len(rows) == 1:
        print(f"{'mode':22} {'R':>3} {'P':>5} {'up MB':>8} {'down MB':>8} {'total/4P':>8} {'vs today':>8} "
              f"{'sync s':>7} {'peak MB':>8} {'peak/state':>10}")
    today = next((t for t in rows if t["mode"] == "today" and t["R"] == x["R"] and t["P_M"] == x["P_M"]), None)
    tot = x["up_MB"] + x["down_MB"]
    vs = f"{(today['up_MB'] + today['down_MB']) / tot:7.1f}x" if today else "       -"
    print(f"{x['mode']:22} {x['R']:3d} {x['P_M']:4d}M {x['up_MB']:8.1f} {x['down_MB']:8.1f} "
          f"{tot / x['fp32_P_MB']:8.2f} {vs} {x['wall_s']:7.2f} {x['peak_over_base_MB']:8.0f} "
          f"{x['peak_over_base_MB'] / x['state_MB']:10.2f}", flush=True)


if __name__ == "__main__":
    main()

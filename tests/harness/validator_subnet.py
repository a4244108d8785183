"""A hand-built subnet for the validator tests: rclone S3, a LocalChain with a validator, the
bridge process and in-process `Miner`s (honest, bf16, or a drills cheater, plus a junk uploader),
run to the end of the run; and an independent count of verified throughput."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

from drills.cheaters import cheating_miner
from neurons.transfer import ObjectTransfer
from protocol.bridge_client import BridgeClient
from protocol.messages import HopLog, Metrics
from resbm import data
from resbm.config import ModelConfig
from tests.harness.watched import WatchedThread, raise_crashes
from tests.servers import make_chain, start_bridge, start_s3

__all__ = ["ALPHA", "BURN", "COMPUTE", "RATE_LIMIT", "JunkTransfer", "run_config", "run_subnet", "workers",
           "throughput_by_miner"]

log = logging.getLogger(__name__)

BURN = 0.1
ALPHA = 0.3
RATE_LIMIT = 100  # make_chain's default; at 12 s a block only advance_blocks can pass it in a test
COMPUTE = {"fwd": 1.0, "bwd": 2.0, "fwdbwd": 3.0, "bwd_recompute": 3.0}


# A hop's lease must outlast its compute plus its place in the miner's upload queue (up to 8
# outputs on 2 threads, prefetched leases included) on a loaded 2-core box: lease-to-done reached
# 1.4 s at a load of ~9 here. At 4 s an honest replica's hops expired under heavier load; an expired
# backward is redone and, after max_attempts, its sample abandoned, so a stage-0 replica could end a
# round with verified forwards but no verified backward: not a worker, its pseudo-gradient refused
# (no_work), no credit for the round (the "honest miner missed the merge set" of issue 21).
LEASE_SECONDS = 10.0


def run_config() -> dict:
    """Small enough for 2 shared cores; the audit tolerances were measured on this size (docs/BENCHMARKS.md)."""
    model = ModelConfig(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=2, n_heads=2, seq_len=16,
                        n_stages=2, bottleneck_dim=4, wire_codec="bf16").to_dict()
    return dict(run_id="val-test", model=model, n_stages=2, batch_size=2, micro_batches_per_step=2,
                inner_steps_per_round=2, samples_per_round=12, muon_lr=0.02, adamw_lr=3e-3,
                warmup_steps=0, total_rounds=2, data_seed=3, init_seed=4, lease_seconds=LEASE_SECONDS,
                max_object_bytes=16 * 2**20, merge_timeout_seconds=30.0, max_attempts=5,
                audit_window_rounds=4, version_key=7, val_tokens=1024,  # the live held-out loss: 64 windows
                incentives={"audit_fraction": 1.0, "burn_share": BURN, "ema_alpha": ALPHA})


class JunkTransfer(ObjectTransfer):
    """Uploads random bytes of the right length in place of every hop output."""

    def put(self, url: str, data_: bytes) -> None:
        if "/act/" in url or "/grad/" in url:
            data_ = os.urandom(len(data_))
        super().put(url, data_)


def _wait_done(client: BridgeClient, threads: list[threading.Thread], timeout: float) -> Metrics:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raise_crashes(threads)  # a dead miner fails the run here, with its traceback
        m = client.metrics()
        if m.phase == "done":  # miners still retrying a refused merge are stopped by the fixture
            return m
        time.sleep(0.5)
    raise_crashes(threads)
    raise TimeoutError(f"subnet did not finish in {timeout}s: round {m.round} phase {m.phase}, "
                       f"{m.samples_completed}/{m.samples_total} samples")


@contextlib.contextmanager
def run_subnet(tmp: Path, miners: list[tuple], s3=None, prepare=None, bridge_flags: tuple[str, ...] = (),
               **run_over):
    """Start S3 (unless given one), a LocalChain, the bridge (with `bridge_flags`) and in-process miners;
    run to the end; yield the pieces. `miners` rows are (name, cheat, dtype, stage the alternating
    registration must give it); `prepare(name, miner)` runs on each miner before it registers.
    """
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    own_s3 = s3 is None
    s3 = start_s3(tmp / "s3") if own_s3 else s3
    try:  # a bridge that never came up leaves no S3 server of ours behind
        chain, keys = make_chain(tmp / "chain.db", miners=len(miners), validators=1, prefix="vm")
        assert chain.weights_rate_limit() == RATE_LIMIT
        bridge = start_bridge(tmp / "bridge", dict(run_config(), **run_over), tmp / "chain.db", s3,
                              extra=bridge_flags)
    except BaseException:
        if own_s3:
            s3.stop()
        torch.set_num_threads(old_threads)
        raise
    running, threads, names = [], [], {}
    try:
        for (name, kind, dtype, want_stage), kp in zip(miners, keys["miners"]):
            transfer = JunkTransfer() if kind == "junk" else ObjectTransfer()
            m = cheating_miner("honest" if kind == "junk" else kind, BridgeClient(kp, bridge.url, bridge.hotkey),
                               transfer, dtype=dtype, max_hops=2)
            if prepare is not None:
                prepare(name, m)
            a = m.register()
            assert a.stage == want_stage, f"{name} got stage {a.stage}, expected {want_stage}"
            running.append(m)
            names[name] = kp.ss58_address
        for (name, *_), m in zip(miners, running):
            threads.append(WatchedThread(m.run_forever, name))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        observer = BridgeClient(keys["validators"][0], bridge.url, bridge.hotkey)
        metrics = _wait_done(observer, threads, timeout=150.0)
        log.warning("subnet run took %.1fs; miners still running at the end: %s", time.monotonic() - t0,
                    [t.name for t in threads if t.is_alive()])
        yield dict(tmp=tmp, chain=chain, keys=keys, bridge=bridge, names=names, metrics=metrics,
                   client=observer, uid={n: chain.uid_of(hk) for n, hk in names.items()}, s3=s3,
                   miners={name: m for (name, *_), m in zip(miners, running)})
    finally:
        for m in running:
            m.stop.set()
        for t in threads:
            t.join(timeout=10)
        for m in running:
            m.close()
        bridge.stop()
        if own_s3:
            s3.stop()
        torch.set_num_threads(old_threads)


def workers(hoplog: HopLog) -> set[str]:
    """Hotkeys with a verified hop in the round (routing decides who works in a round)."""
    return {r.miner_hotkey for r in hoplog.records}


def throughput_by_miner(hoplog: HopLog) -> dict[str, float]:
    """Compute-weighted hops per hotkey, counted here independently of neurons.scoring; a miner
    whose pseudo-gradient is not in the round's merge set earns nothing for the round."""
    out: dict[str, float] = {}
    merged = {p.hotkey for p in hoplog.pseudograds}
    for r in hoplog.records:
        if r.miner_hotkey not in merged:
            continue
        kind = "bwd_recompute" if (r.kind == "bwd" and r.recompute) else r.kind
        out[r.miner_hotkey] = out.get(r.miner_hotkey, 0.0) + COMPUTE[kind]
    return out

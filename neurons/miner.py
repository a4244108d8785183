"""Miner entry point: serve one pipeline stage of a ResBM run.

    python neurons/miner.py --wallet.name W --wallet.hotkey H --netuid 9 \
        --subtensor.network finney --bridge.url https://bridge.example

Loads the wallet, checks registration on the chain, registers with the bridge, receives a stage
and the round's weights, then leases and serves hops until stopped (SIGINT/SIGTERM finish the
hops in hand and exit cleanly).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from neurons import metrics
from neurons.cli import base_parser, load_keypair, open_chain, parse_args, setup_logging
from neurons.miner_loop import Miner
from neurons.transfer import LinkEmulator, ObjectTransfer
from protocol.client import SignedClient, fetch_receiver_hotkey
from resbm.train import pick_device

__all__ = ["main", "build_parser"]


def build_parser():
    """The miner's flags."""
    p = base_parser("resbm-miner", "Serve one pipeline stage of a ResBM training run.")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (parameters and optimizer state stay float32)")
    p.add_argument("--max-hops", type=int, default=4, help="hops leased at once (inputs prefetched in parallel)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--status-file", default="", help="write a JSON status snapshot here every status interval")
    return p


def main(argv=None, parser=None, make_miner=None) -> int:
    """Run the miner until stopped (`parser` / `make_miner(args, **kwargs)`: for drills)."""
    args = parse_args(parser or build_parser(), argv)
    log = setup_logging(getattr(args, "logging.debug"), "miner")
    if args.threads:
        torch.set_num_threads(args.threads)
    keypair = load_keypair(args)
    chain = open_chain(args)
    uid = chain.uid_of(keypair.ss58_address)
    if uid is None:
        log.error("hotkey %s is not registered on netuid %d (%s); register it first",
                  keypair.ss58_address, args.netuid, getattr(args, "subtensor.network"))
        return 2
    bridge_url = getattr(args, "bridge.url")
    client = SignedClient(keypair, bridge_url, fetch_receiver_hotkey(bridge_url))
    link = LinkEmulator(getattr(args, "link.mbps"), getattr(args, "link.latency_ms"))
    make = make_miner or (lambda _args, **kw: Miner(**kw))
    miner = make(args, client=client, transfer=ObjectTransfer(link), device=str(pick_device(args.device)),
                 dtype=getattr(torch, args.dtype), max_hops=args.max_hops)
    miner.status.every = args.status_every
    metrics.serve(getattr(args, "metrics.port"), metrics.miner_registry(miner.status))
    if args.status_file:
        _write_status_periodically(miner, args.status_file, args.status_every)
    a = miner.register()
    n_params = sum(p.numel() for p in miner.worker.module.parameters())
    log.info("uid %d serving stage %d/%d (%.2fM params, code %s %s) on %s, round %d, bridge %s",
             uid, a.stage, a.run.n_stages, n_params / 1e6, "x".join(map(str, miner.shape)), miner.codec,
             miner.device, a.round, bridge_url)

    def on_signal(signum, _frame):
        log.info("signal %d: finishing the hops in hand, then exiting", signum)
        miner.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        miner.run_forever()
    finally:
        miner.close()
        if args.status_file:
            _dump_status(miner, args.status_file)
    log.info("stopped: %s", json.dumps(miner.status.summary()))
    return 0


def _dump_status(miner: Miner, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(miner.status.summary(), f)
    os.replace(tmp, path)


def _write_status_periodically(miner: Miner, path: str, every: float) -> None:
    def loop():
        while not miner.stop.wait(min(every, 2.0)):
            _dump_status(miner, path)
    threading.Thread(target=loop, daemon=True, name="status").start()


if __name__ == "__main__":
    sys.exit(main())

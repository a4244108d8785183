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

from neurons.cli import (NeuronSettings, connect_bridge, load_settings, resolve_device, setup_logging,
                         start_checks)
from protocol.exits import exits_cleanly
from protocol.settings import build_parser as settings_parser
from protocol.settings import flag

__all__ = ["main", "build_parser", "MinerSettings"]

DESCRIPTION = "Serve one pipeline stage of a ResBM training run."


class MinerSettings(NeuronSettings):
    """The miner's settings (flags, RESBM_* variables, .env)."""

    dtype: str = flag("float32", "compute dtype (parameters and optimizer state stay float32)",
                      choices=["float32", "bfloat16", "float16"])
    max_hops: int = flag(4, "hops leased at once (inputs prefetched in parallel)")
    max_open_graphs: int = flag(0, "forward graphs held at most (each holds a sample's stage activations "
                                "until its backward; bounds GPU memory); 0 = as many as the step quota")
    threads: int = flag(0, "torch CPU threads (0 = torch default)")
    max_memory: str = flag("auto", "memory the stage's kept forward graphs may hold: a size (24GiB), a fraction "
                           "of the device (0.4), none, or auto (half the GPU memory free once the model is "
                           "built; none on a CPU); over it a forward keeps only its input and its backward "
                           "recomputes")
    status_file: str = flag("", "write a JSON status snapshot here every status interval")


def build_parser():
    """The miner's flags (generated from `MinerSettings`)."""
    return settings_parser(MinerSettings, "resbm-miner", DESCRIPTION)


@exits_cleanly
def main(argv=None, settings: type[MinerSettings] = MinerSettings, prog: str = "resbm-miner",
         make_miner=None) -> int:
    """Run the miner until stopped (`settings` with extra fields and `make_miner(args, **kwargs)`:
    for drills)."""
    args = load_settings(settings, argv, prog=prog, description=DESCRIPTION)
    log = setup_logging(args, "miner")
    device = resolve_device(args.device)  # before registering: a bad device must not take a stage
    _check_max_memory(args.max_memory, device)
    keypair, _chain, uid = start_checks(args, log)
    bridge_hotkey = connect_bridge(args, log)

    import torch

    from neurons.miner_loop import Miner
    from neurons.request_log import RequestLog
    from neurons.transfer import LinkEmulator, ObjectTransfer
    from protocol.bridge_client import BridgeClient
    if args.threads:
        torch.set_num_threads(args.threads)
    client = BridgeClient(keypair, args.bridge_url, bridge_hotkey)
    transfer = ObjectTransfer(LinkEmulator(args.link_mbps, args.link_latency_ms))
    requests = RequestLog()  # every request, by route and hop kind: the status file and metrics show it
    client.on_call, transfer.on_request = requests.on_call, requests.on_transfer
    make = make_miner or (lambda _args, **kw: Miner(**kw))
    miner = make(args, client=client, transfer=transfer, device=device,
                 dtype=getattr(torch, args.dtype), max_hops=args.max_hops, max_open_graphs=args.max_open_graphs,
                 max_memory=args.max_memory)
    miner.status.requests = requests
    miner.status.listeners.append(requests.on_compute)
    miner.status.every = args.status_every
    from neurons import metrics
    metrics.serve(args.metrics_port, metrics.miner_registry(miner.status))
    if args.status_file:
        _write_status_periodically(miner, args.status_file, args.status_every)
    a = miner.register()
    n_params = sum(p.numel() for p in miner.worker.module.parameters())
    log.info("uid %d serving stage %d/%d (%.2fM params, code %s %s) on %s, round %d, bridge %s",
             uid, a.stage, a.run.n_stages, n_params / 1e6, "x".join(map(str, miner.shape)), miner.codec,
             miner.device, a.round, args.bridge_url)

    def on_signal(signum, _frame):
        log.info("signal %d: finishing the hops in hand, then exiting", signum)
        miner.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        miner.run_forever()
    finally:
        miner.close()  # the hops in hand (a lease asked ahead included) are finished and reported
        _leave(client, log)  # then the bridge moves nothing of ours elsewhere
        requests.settle()
        if args.status_file:
            _dump_status(miner, args.status_file)
    log.info("stopped: %s", json.dumps(miner.status.summary()))
    return 0


def _check_max_memory(spec: str, device: str) -> None:
    """A bad --max-memory is one line at start, before the miner takes a stage."""
    import torch

    from neurons.stage_memory import parse_memory
    from protocol.exits import Exit, Misconfigured
    try:
        parse_memory(spec, torch.device(device))
    except ValueError as exc:
        raise Misconfigured(Exit.USAGE, str(exc)) from None


def _leave(client, log) -> None:
    """Tell the bridge this process is going, so its leases move at once (best effort)."""
    try:
        from protocol.messages import LeaveRequest
        client.leave(LeaveRequest(reason="shutdown"))
        log.info("told the bridge we are leaving")
    except Exception as exc:  # noqa: BLE001 - best effort: shutdown must go on
        log.warning("could not tell the bridge we are leaving: %s", exc)


def _dump_status(miner, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(miner.status.summary(), f)
    os.replace(tmp, path)


def _write_status_periodically(miner, path: str, every: float) -> None:
    def loop():
        while not miner.stop.wait(min(every, 2.0)):
            _dump_status(miner, path)
    threading.Thread(target=loop, daemon=True, name="status").start()


if __name__ == "__main__":
    sys.exit(main())

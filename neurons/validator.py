"""Validator entry point: audit gradient integrity, score verified throughput, set weights.

    python neurons/validator.py --wallet.name W --wallet.hotkey H --netuid 9 \
        --subtensor.network finney --bridge.url https://bridge.example

Needs a validator permit on the subnet (the bridge serves hop logs only to permitted hotkeys).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurons import metrics
from neurons.cli import base_parser, load_keypair, open_chain, parse_args, setup_logging
from neurons.transfer import LinkEmulator, ObjectTransfer
from neurons.validator_loop import Validator, ValidatorSettings
from protocol.client import SignedClient, fetch_receiver_hotkey
from resbm.train import pick_device

__all__ = ["main"]


def build_parser():
    """The validator's flags."""
    p = base_parser("resbm-validator", "Audit miners' work by replay, score throughput and set weights.")
    d = ValidatorSettings()
    p.add_argument("--state-path", default=d.state_path, help="where scores and progress persist (JSON)")
    p.add_argument("--audit.fraction", type=float, default=d.audit_fraction,
                   help="base probability of auditing each miner after a round (boosted for new/failed miners)")
    p.add_argument("--audit.max-seconds", type=float, default=d.audit_max_seconds,
                   help="compute budget of one audited miner-round; past it the audit is 'incomplete'")
    p.add_argument("--burn-share", type=float, default=d.burn_share, help="share of weight set on the owner's uid")
    p.add_argument("--ema-alpha", type=float, default=d.ema_alpha, help="score smoothing over windows")
    p.add_argument("--penalty-windows", type=int, default=d.penalty_windows,
                   help="windows a miner earns nothing after a failed audit")
    p.add_argument("--poll-seconds", type=float, default=d.poll_seconds, help="how often to poll the bridge")
    p.add_argument("--seed", type=int, default=None, help="fix the audit choice (tests only)")
    return p


def main(argv=None) -> int:
    """Run the validator until stopped."""
    args = parse_args(build_parser(), argv)
    log = setup_logging(getattr(args, "logging.debug"), "validator")
    keypair = load_keypair(args)
    chain = open_chain(args)
    uid = chain.uid_of(keypair.ss58_address)
    if uid is None:
        log.error("hotkey %s is not registered on netuid %d", keypair.ss58_address, args.netuid)
        return 2
    bridge_url = getattr(args, "bridge.url")
    client = SignedClient(keypair, bridge_url, fetch_receiver_hotkey(bridge_url))
    settings = ValidatorSettings(
        state_path=args.state_path, audit_fraction=getattr(args, "audit.fraction"),
        audit_max_seconds=getattr(args, "audit.max_seconds"), burn_share=args.burn_share,
        ema_alpha=args.ema_alpha, penalty_windows=args.penalty_windows, poll_seconds=args.poll_seconds,
        device=str(pick_device(args.device)), seed=args.seed)  # auto: CUDA when present (like-for-like GPU replays)
    link = LinkEmulator(getattr(args, "link.mbps"), getattr(args, "link.latency_ms"))
    v = Validator(client, ObjectTransfer(link), chain, keypair, settings)
    metrics.serve(getattr(args, "metrics.port"), metrics.validator_registry(v))
    log.info("validator uid %d on netuid %d, bridge %s, run %s, resuming at round %d",
             uid, args.netuid, bridge_url, v.run.run_id, v.next_round)

    def on_signal(signum, _frame):
        log.info("signal %d: stopping", signum)
        v.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    v.run_forever()
    log.info("stopped: %d audits, %d failed, %d weight sets", v.audits.runs, v.audits.failed, v.weights_set)
    return 0


if __name__ == "__main__":
    sys.exit(main())

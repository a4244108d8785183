"""Validator entry point: audit gradient integrity, score verified throughput, set weights.

    python neurons/validator.py --wallet.name W --wallet.hotkey H --netuid 9 \
        --subtensor.network finney --bridge.url https://bridge.example

Needs a validator permit on the subnet (the bridge serves hop logs only to permitted hotkeys).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurons.cli import (NeuronSettings, connect_bridge, load_settings, resolve_device, setup_logging,
                         start_checks)
from protocol.exits import exits_cleanly
from protocol.settings import build_parser as settings_parser
from protocol.settings import flag

__all__ = ["main", "build_parser", "ValidatorConfig"]

DESCRIPTION = "Audit miners' work by replay, score throughput and set weights."


class ValidatorConfig(NeuronSettings):
    """The validator's settings (flags, RESBM_* variables, .env)."""

    # defaults equal neurons.validator_loop.ValidatorSettings' (a test checks); importing it here
    # would load torch before a mistake can be reported
    state_path: str = flag("validator_state.json", "where scores and progress persist (JSON)")
    audit_fraction: float = flag(0.5, "base probability of auditing each miner after a "
                                 "round (boosted for new/failed miners)", name="audit.fraction")
    audit_max_seconds: float = flag(120.0, "compute budget of one audited miner-round; "
                                    "past it the audit is 'incomplete'", name="audit.max-seconds")
    burn_share: float = flag(0.1, "share of weight set on the owner's uid")
    ema_alpha: float = flag(0.3, "score smoothing over windows")
    penalty_windows: int = flag(3, "windows a miner earns nothing after a failed audit")
    poll_seconds: float = flag(2.0, "how often to poll the bridge")
    seed: Optional[int] = flag(None, "fix the audit choice (tests only)")


def build_parser():
    """The validator's flags (generated from `ValidatorConfig`)."""
    return settings_parser(ValidatorConfig, "resbm-validator", DESCRIPTION)


@exits_cleanly
def main(argv=None) -> int:
    """Run the validator until stopped."""
    args = load_settings(ValidatorConfig, argv, prog="resbm-validator", description=DESCRIPTION)
    log = setup_logging(args, "validator")
    device = resolve_device(args.device)
    keypair, chain, uid = start_checks(args, log, need_permit=True)
    bridge_hotkey = connect_bridge(args, log)

    from neurons.transfer import LinkEmulator, ObjectTransfer
    from neurons.validator_loop import Validator, ValidatorSettings
    from protocol.bridge_client import BridgeClient
    client = BridgeClient(keypair, args.bridge_url, bridge_hotkey)
    settings = ValidatorSettings(
        state_path=args.state_path, audit_fraction=args.audit_fraction,
        audit_max_seconds=args.audit_max_seconds, burn_share=args.burn_share,
        ema_alpha=args.ema_alpha, penalty_windows=args.penalty_windows, poll_seconds=args.poll_seconds,
        device=device, seed=args.seed)
    link = LinkEmulator(args.link_mbps, args.link_latency_ms)
    v = Validator(client, ObjectTransfer(link), chain, keypair, settings)
    from neurons import metrics
    metrics.serve(args.metrics_port, metrics.validator_registry(v))
    log.info("validator uid %d on netuid %d, bridge %s, run %s, device %s, resuming at round %d",
             uid, args.netuid, args.bridge_url, v.run.run_id, device, v.next_round)

    def on_signal(signum, _frame):
        log.info("signal %d: stopping", signum)
        v.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    v.run_forever()
    log.info("stopped: %d audits, %d failed, %d without a verdict (uncalibrated or inconclusive), %d weight sets",
             v.audits.runs, v.audits.failed, v.audits.withheld, v.weights_set)
    return 0


if __name__ == "__main__":
    sys.exit(main())

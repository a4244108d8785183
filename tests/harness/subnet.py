"""Start a whole subnet from a `Scenario` and report its `Outcome`.

Real parts on loopback: rclone's S3 server and the bridge as processes, a LocalChain file,
real keypairs, the real `Miner` (or a drills cheater) per replica and the real `Validator`,
each in its own thread of this process (nine torch imports would cost the shared CPU more than
the run). The validator runs alongside the miners, as in production: it settles disputes,
audits, recomputes merges and reports verdicts (quarantine) while the run goes on.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drills.cheaters import cheating_miner
from neurons.model_fetch import fetch_weights
from neurons.sync_follow import GONE, get_view
from neurons.transfer import ObjectTransfer
from neurons.validator_loop import Validator, ValidatorSettings
from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.messages import HopLog, Metrics
from resbm import data
from resbm.config import ModelConfig
from resbm.stages import build_stages
from resbm.train import evaluate
from tests.harness.laggard import LaggardMiner
from tests.harness.watched import WatchedThread, raise_crashes
from tests.servers import make_chain, start_bridge, start_s3

__all__ = ["Scenario", "Outcome", "run_scenario", "tiny_model"]

log = logging.getLogger(__name__)


def tiny_model(n_stages: int) -> dict[str, Any]:
    """The tests' model: small enough for 2 shared cores."""
    return ModelConfig(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=n_stages, n_heads=2, seq_len=16,
                       n_stages=n_stages, bottleneck_dim=4, wire_codec="bf16").to_dict()


@dataclass(frozen=True)
class Scenario:
    """A subnet to run: stages, honest replicas per stage, one cheater kind per stage (joining
    after the honest replicas, so each lands on its own stage), rounds, seed, run overrides."""

    stages: int = 2
    honest_per_stage: int = 1
    cheaters: tuple[str, ...] = ()
    rounds: int = 3
    seed: int = 1
    samples_per_replica: int = 4
    run: tuple[tuple[str, Any], ...] = ()
    join_round: int | None = None  # an honest replica joins once the run reaches this round
    laggard: tuple[int, int] | None = None  # (stall, resume): the last honest replica stalls in its
                                            # merge of round `stall` until the run reaches `resume`
    busy_seconds: float = 0.0  # the validator's loop spends this long elsewhere before each pass
    bridge_flags: tuple[str, ...] = ()  # extra `python -m bridge` flags

    @property
    def replicas(self) -> int:
        """Replicas per stage, the cheater included."""
        return self.honest_per_stage + (1 if self.cheaters else 0)

    def run_config(self) -> dict[str, Any]:
        """The bridge's run config for this scenario."""
        cfg = dict(run_id="scenario", model=tiny_model(self.stages), n_stages=self.stages, batch_size=2,
                   micro_batches_per_step=2, inner_steps_per_round=2,
                   samples_per_round=self.samples_per_replica * self.replicas,
                   muon_lr=0.05, adamw_lr=1e-2, warmup_steps=0, total_rounds=self.rounds,
                   data_seed=self.seed, init_seed=self.seed + 100, lease_seconds=5.0,
                   max_object_bytes=2**20, merge_timeout_seconds=60.0, vote_timeout_seconds=15.0,  # a loaded box merges slowly
                   arbitration_timeout_seconds=30.0, max_attempts=5, audit_window_rounds=8,
                   sync_mode="state")  # the merge cheats' drills are the whole-state merge's; `run` may say sharded
        cfg.update(dict(self.run))
        return cfg


@dataclass
class Outcome:
    """What a scenario's run left behind."""

    names: dict[str, str]                # miner name -> hotkey
    kinds: dict[str, str]                # miner name -> honest | cheater kind
    stage_of: dict[str, int]
    metrics: Metrics
    hoplogs: list[HopLog]
    verdicts: list[tuple[int, str, bool, str]]  # (round, name, passed, reason)
    weights: dict[str, float]            # miner name -> weight on chain
    val_loss: float                      # the last published model's (what the subnet produced)
    init_loss: float
    miner_loss: float | None = None      # the first honest replica per stage's in-memory weights at the end
    round_losses: dict[int, float] = field(default_factory=dict)  # round -> the validator's held-out loss after it
    joined: dict[str, Any] | None = None  # the late joiner: name, round, (checkpoint round, updates replayed)
    round_starts: tuple[int, int] = (0, 0)  # sharded sync: round starts the validator rebuilt, advanced
    views: dict[tuple[int, int], Any] = field(default_factory=dict)  # sharded: (round, stage) -> SyncView
    laggard: dict[str, Any] | None = None  # name, what its round's view said, catch_ups, theta, peer_theta

    def honest(self) -> list[str]:
        """Names of the honest miners."""
        return [n for n, k in self.kinds.items() if k == "honest"]

    def cheaters(self) -> list[str]:
        """Names of the cheating miners."""
        return [n for n, k in self.kinds.items() if k != "honest"]

    def cheated_rounds(self) -> list[int]:
        """Rounds in which a cheater's pseudo-gradient was in a merge set (before its verdict
        quarantined it; how many depends on how far the validator's replays lag)."""
        bad = {self.names[n] for n in self.cheaters()}
        return [log.round for log in self.hoplogs if bad & {p.hotkey for p in log.pseudograds}]


def _wait_registered(client: BridgeClient, count: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(client.metrics().miners) >= count:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{count} miners did not register in {timeout}s")


class BusyValidator(Validator):
    """A validator whose loop is busy elsewhere (a long audit, a slow chain) before each pass."""

    busy = 0.0

    def tick(self, max_rounds: int | None = None) -> None:
        """Wait `busy` seconds, then one pass."""
        self.stop.wait(self.busy)
        super().tick(max_rounds)


def _val_loss(model: dict, init_seed: int, thetas: list[dict] | None) -> float:
    cfg = ModelConfig.from_dict(model)
    stages = build_stages(cfg, seed=init_seed)
    if thetas is not None:
        for stage, theta in zip(stages, thetas):
            stage.load_state_dict(theta)
    return evaluate(stages, data.validation_batches(4, 2, cfg.seq_len), torch.device("cpu"))


def _published(observer: BridgeClient) -> list[dict]:
    """The stages' weights the run published last, fetched and verified as resbm-export does: the
    subnet's product, whatever state a miner held when it left."""
    return fetch_weights(ObjectTransfer(), observer.model(None)).thetas


def _round_starts(validator) -> tuple[int, int]:
    starts = validator.round_starts
    return (0, 0) if starts is None else (starts.rebuilt, starts.advanced)


def run_scenario(tmp: Path, sc: Scenario, timeout: float = 420.0) -> Outcome:
    """Run `sc` to the end (the validator included) and collect the outcome."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rc = sc.run_config()
    n_honest = sc.stages * sc.honest_per_stage
    kinds = ["honest"] * n_honest + list(sc.cheaters)
    s3 = start_s3(tmp / "s3")
    try:  # a bridge that never came up leaves no S3 server behind (on a loaded box they pile up)
        chain, keys = make_chain(tmp / "chain.db", miners=len(kinds) + (sc.join_round is not None), validators=1,
                                 prefix=f"s{sc.seed}m")
        chain.advance_blocks(chain.weights_rate_limit())
        bridge = start_bridge(tmp / "bridge", rc, tmp / "chain.db", s3, extra=sc.bridge_flags)
    except BaseException:
        s3.stop()
        torch.set_num_threads(old_threads)
        raise
    vkey = keys["validators"][0]
    observer = BridgeClient(vkey, bridge.url, bridge.hotkey)
    miners, threads, names, stage_of = [], [], {}, {}
    validator = None
    joined = None

    lag = n_honest - 1 if sc.laggard is not None else None

    def start_miner(i: int, kind: str) -> str:
        kp = keys["miners"][i]
        client = BridgeClient(kp, bridge.url, bridge.hotkey)
        if i == lag:
            m = LaggardMiner(client, ObjectTransfer(), max_hops=2, stall=sc.laggard[0], resume=sc.laggard[1])
        else:
            m = cheating_miner(kind, client, ObjectTransfer(), max_hops=2)
        name = "laggard" if i == lag else f"{kind}{i}" if i < len(kinds) else f"joiner{i}"
        stage_of[name] = m.register().stage
        names[name] = kp.ss58_address
        miners.append(m)
        threads.append(WatchedThread(m.run_forever, name))
        threads[-1].start()
        return name
    try:
        for i, kind in enumerate(list(kinds)):
            if i >= n_honest:
                _wait_registered(observer, i)  # one cheater per stage: join after the others
            start_miner(i, kind)
        settings = ValidatorSettings(state_path=str(tmp / "validator.json"),
                                     audit_max_seconds=60.0, poll_seconds=0.3, seed=sc.seed)
        validator = (BusyValidator if sc.busy_seconds else Validator)(observer, ObjectTransfer(), chain, vkey, settings)
        validator.busy = sc.busy_seconds
        vthread = WatchedThread(validator.run_forever, "validator")
        vthread.start()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            raise_crashes([*threads, vthread])  # a dead miner or validator fails here, with its traceback
            m = observer.metrics()
            if joined is None and sc.join_round is not None and m.round >= sc.join_round and m.phase == "train":
                name = start_miner(len(kinds), "honest")
                kinds.append("honest")
                joined = {"name": name, "round": miners[-1].state.round,
                          "caught_up": miners[-1].state.caught_up}
            if m.phase == "done" and validator.next_round >= sc.rounds:
                if not validator.pending_window:
                    for t in threads:  # each miner ends its last round (it leaves on `done`)
                        t.join(timeout=max(0.0, min(10.0, end - time.monotonic())))
                    break
                chain.advance_blocks(chain.weights_rate_limit())  # let the last window's weights land
            time.sleep(0.3)
        else:
            raise_crashes([*threads, vthread])
            raise TimeoutError(f"scenario {sc} did not finish in {timeout}s: round {m.round} {m.phase}, "
                               f"validator at round {validator.next_round}")
        raise_crashes([*threads, vthread])
        by_key = {hk: n for n, hk in names.items()}
        hoplogs = [observer.hoplog(r)
                   for r in range(sc.rounds)]
        on_chain = chain.weights_of(vkey.ss58_address)
        weights = {n: on_chain.get(chain.uid_of(hk), 0.0) for n, hk in names.items()}
        final = {}
        for name, miner in zip(names, miners):
            if kinds[list(names).index(name)] == "honest" and stage_of[name] not in final:
                final[stage_of[name]] = miner.worker.theta()
        thetas = [final[s] for s in range(sc.stages)] if len(final) == sc.stages else None
        views = _sync_views(observer, sc) if rc.get("sync_mode") == "sharded" else {}
        laggard = None
        if lag is not None:
            lm, ln = miners[lag], list(names)[lag]
            laggard = {"name": ln, "seen": list(lm.seen), "catch_ups": list(lm.catch_ups), "theta": lm.worker.theta(),
                       "peer_theta": final[stage_of[ln]]}
        return Outcome(
            names=names, kinds=dict(zip(names, kinds)), stage_of=stage_of, metrics=m, hoplogs=hoplogs,
            verdicts=[(r, by_key.get(hk, hk), ok, why) for r, hk, ok, why in validator.audits.verdicts],
            weights=weights,
            val_loss=_val_loss(rc["model"], rc["init_seed"], _published(observer)),
            miner_loss=None if thetas is None else _val_loss(rc["model"], rc["init_seed"], thetas),
            init_loss=_val_loss(rc["model"], rc["init_seed"], None),
            joined=None if joined is None else {**joined, "theta": miners[-1].worker.theta(),
                                                "peer_theta": final.get(stage_of[joined["name"]])},
            views=views, laggard=laggard, round_starts=_round_starts(validator),
            round_losses=dict(validator.live.reported))
    finally:
        if validator is not None:
            validator.stop.set()
        for m_ in miners:
            m_.stop.set()
        for t in threads:
            t.join(timeout=10)
        for m_ in miners:
            with contextlib.suppress(Exception):
                m_.close()
        bridge.stop()
        s3.stop()
        torch.set_num_threads(old_threads)


def _sync_views(observer: BridgeClient, sc: Scenario) -> dict[tuple[int, int], Any]:
    """Every kept round's sync view per stage (decisions, votes), from the bridge's archive."""
    views = {}
    for r in range(sc.rounds):
        for s in range(sc.stages):
            try:
                views[(r, s)] = get_view(observer, r, s)
            except BridgeError as exc:
                if exc.code not in GONE:
                    raise
    return views

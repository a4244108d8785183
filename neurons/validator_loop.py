"""The validator's loop: after each round closes, score every miner's hops, audit a random few by
replay, and set weights on chain within the rate limit. The score book is saved after every
change, so a restarted validator loses nothing and never audits a round twice.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
from dataclasses import dataclass, field

import httpx

from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.lifecycle import Phase
from protocol.messages import HopLog, Metrics
from neurons.dataset_http import HttpSource
from neurons.audit_hints import explain_incomplete
from neurons.round_audit import ClaimError, audit_miner, hop_counts
from neurons.scoring import ScoreBook, choose_audits, compute_weights
from neurons.shard_validate import RoundStarts
from neurons.sync_choice import sync_for
from neurons.sync_device import pick_sync_device
from neurons.validator_integrity import report_verdicts
from neurons.stage_worker import WorkerError
from neurons.transfer import ObjectTransfer, TransferError
from neurons.validator_eval import LiveValidation
from neurons.validator_publish import ReportPublisher
from neurons.validator_settings import ValidatorSettings
from resbm import data
from resbm.dataset_store import DataError
from resbm.outer import OuterError

__all__ = ["ValidatorSettings", "Validator"]

log = logging.getLogger("validator")


@dataclass
class AuditLog:
    """Counts of audits by outcome, for the status line and reports."""

    runs: int = 0
    failed: int = 0
    incomplete: int = 0
    withheld: int = 0
    """Audits that gave no verdict: uncalibrated combinations, or replays as noisy as the claim."""
    seconds: float = 0.0
    verdicts: list = field(default_factory=list)
    uncalibrated: set = field(default_factory=set)
    """Combinations (AuditReport.context) audited without a calibration, for the owner's dashboard."""


class Validator:
    """Audits, scores and sets weights for one run."""

    def __init__(self, client: BridgeClient, transfer: ObjectTransfer, chain, keypair, settings: ValidatorSettings):
        self.client, self.transfer, self.chain, self.keypair = client, transfer, chain, keypair
        self.s = settings
        self.stop = threading.Event()
        self.run = client.run_info().run
        dataset = data.open_run_dataset(self.run.dataset, client.dataset_url, HttpSource)  # audits read its tokens
        self.live = LiveValidation(client, transfer, self.run, dataset, settings.device)
        self.params = self.run.incentives  # the run's, shared by all validators
        self.book = ScoreBook.load(settings.state_path + ".scores", params=self.params)
        self.publisher, self.last_weights, self.on_weights = ReportPublisher(client), {}, None
        meta = self._load_meta()
        self.next_round: int = meta.get("next_round", 0)
        self.pending_window: bool = meta.get("pending_window", False)
        self.pending_weights: list | None = meta.get("pending_weights")
        self.weights_set = 0
        self.audits = AuditLog()
        self.unverified: dict[str, int] = {}
        """Lease expiries per miner hotkey from the bridge's metrics (refused or abandoned claims)."""
        self.rng = random.Random(settings.seed) if settings.seed is not None else None
        self.settled: set = set()  # (round, stage) disputes this validator already answered
        self._settling = threading.Lock()  # one recomputation pass at a time (loop or settler thread)
        self.round_starts: RoundStarts | None = None  # sharded sync: stages' rebuilt round starts

    # ----- persistence -----
    def _load_meta(self) -> dict:
        if os.path.exists(self.s.state_path):
            with open(self.s.state_path) as f:
                return json.load(f)
        return {}

    def _save(self) -> None:
        self.book.save(self.s.state_path + ".scores")
        tmp = self.s.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"next_round": self.next_round, "pending_window": self.pending_window,
                       "pending_weights": self.pending_weights}, f)
        os.replace(tmp, self.s.state_path)

    # ----- loop -----
    def run_forever(self) -> None:
        """Process closed rounds and set weights until stopped; disputes are settled on a thread of
        their own, so a long audit never makes a stage wait past its arbitration deadline."""
        settler = threading.Thread(target=self._settle_forever, name="dispute-settler", daemon=True)
        settler.start()
        while not self.stop.is_set():
            try:
                self.tick()
            except (BridgeError, httpx.TransportError) as exc:  # e.g. the bridge is restarting
                log.warning("bridge error: %s", exc)
            self.stop.wait(self.s.poll_seconds)

    def _settle_forever(self) -> None:
        while not self.stop.is_set():
            try:
                self.settle_disputes()
            except (BridgeError, httpx.TransportError) as exc:
                log.warning("dispute settler: bridge error: %s", exc)
            except Exception:  # the settler must outlive any one bad answer
                log.exception("dispute settler: unexpected error")
            self.stop.wait(min(self.s.poll_seconds, 1.0))

    def settle_disputes(self) -> int:
        """Recompute and post every open dispute not yet answered; 0 at once while another pass
        runs (the settler thread and the loop share the work, never duplicate it)."""
        if not self._settling.acquire(blocking=False):
            return 0
        try:
            return sync_for(self.run).settle(self.client, self.transfer, self.run, self.settled)
        finally:
            self._settling.release()

    def tick(self, max_rounds: int | None = None) -> None:
        """One pass: process the rounds closed since the last pass (at most `max_rounds`), then maybe set weights."""
        m = self.client.metrics()
        self.bridge_round = m.round  # how far behind an audit is (explain_incomplete)
        self._note_unverified(m)
        if m.phase == Phase.MERGE:
            self.settle_disputes()
        closed = m.round if m.phase != Phase.DONE else m.round + 1
        done = 0
        while self.next_round < closed and not self.stop.is_set() and (max_rounds is None or done < max_rounds):
            self.process_round(self.next_round)
            self.next_round += 1
            self.pending_window = True
            self._save()
            done += 1
        if self.pending_window:
            self.maybe_set_weights()

    def _note_unverified(self, m: Metrics) -> None:
        """Log miners whose claims the bridge refused or let expire (they earn nothing for them)."""
        for mm in m.miners:
            seen = self.unverified.get(mm.hotkey, 0)
            if mm.lease_expiries > seen:
                log.info("miner %s: %d leases expired without a verified output (%d verified hops)",
                         mm.hotkey[:10], mm.lease_expiries, mm.hops_done)
            self.unverified[mm.hotkey] = mm.lease_expiries

    def process_round(self, rnd: int) -> None:
        """Score every miner's verified hops of a closed round and audit a random few."""
        hoplog = self.client.hoplog(rnd)
        miners = sorted({r.miner_hotkey for r in hoplog.records})
        by_miner = {hk: [r for r in hoplog.records if r.miner_hotkey == hk] for hk in miners}
        merged, unpaid = {p.hotkey for p in hoplog.pseudograds}, set(hoplog.unpaid)
        for hk in miners:
            # Work whose pseudo-gradient never reached the merge set did not train the model, and
            # without it a skipped optimizer step can go unseen: no credit for that round.
            if hk not in merged:
                log.info("round %d: %s did %d hops but left no pseudo-gradient in the merge set; no credit",
                         rnd, hk[:10], len(by_miner[hk]))
                continue
            if hk in unpaid:  # it failed an audit; kept its stage alive as its last live replica
                log.info("round %d: %s worked on probation (failed an audit, its stage's last live "
                         "replica); no credit", rnd, hk[:10])
                continue
            self.book.record_round(hk, rnd, hop_counts(by_miner[hk]), stage=by_miner[hk][0].stage)
        # The bridge's `flagged` list is not evidence: the recomputed merge is.
        failed = sync_for(self.run).check_round(self.client, self.transfer, self.run, hoplog, self._round_starts)
        for hk, reason in sorted(failed.items()):
            self.book.record_audit(hk, rnd, False, reason)
            self.audits.verdicts.append((rnd, hk, False, reason))
            log.info("merge check of %s round %d: FAIL - %s", hk[:10], rnd, reason)
        self._report(rnd, failed)
        chosen = choose_audits(miners, rng=self.rng, history=self.book.audit_history(),
                               params=self.params) if miners else []
        for hk in chosen:
            self.settle_disputes()  # stay responsive (the settler thread does this when running)
            if hk not in failed and not self._audit(rnd, hoplog, hk):
                failed[hk] = self.audits.verdicts[-1][3]
                self._report(rnd, {hk: failed[hk]})  # at once: the sooner, the less it weighs
        self.publisher.round_done(rnd, self.book, self.audits.verdicts, self.audits.uncalibrated)
        log.info("round %d: %d hops from %d miners, audited %d", rnd, len(hoplog.records), len(miners), len(chosen))
        self.live.round_done(rnd)

    def _round_starts(self) -> RoundStarts:
        """The stages' rebuilt round starts (kept across rounds), computed on the sync device."""
        if self.round_starts is None:
            self.round_starts = RoundStarts(pick_sync_device(self.s.device))
        return self.round_starts

    def _report(self, rnd: int, failed: dict[str, str]) -> None:
        """Deliver failed verdicts to the bridge (it quarantines); our own book holds them anyway."""
        try:
            quarantined = report_verdicts(self.client, rnd, failed)
        except BridgeError as exc:  # weights still follow our own book
            log.warning("round %d: verdicts not delivered to the bridge: %s", rnd, exc)
            return
        if quarantined:
            log.info("round %d: the bridge quarantined %s", rnd,
                     ", ".join(f"{h[:10]} until round {u}" for h, u in sorted(quarantined.items())))

    def _why(self, reason: str, rnd: int) -> str:
        return explain_incomplete(reason, rnd, getattr(self, "bridge_round", rnd), self.run.audit_window_rounds)

    def _audit(self, rnd: int, hoplog: HopLog, hotkey: str) -> bool:
        """Replay one miner's round; False only when it failed (incomplete counts as not failed)."""
        try:
            inputs = sync_for(self.run).audit_inputs(self.client, self.transfer, self.run, rnd, hotkey,
                                                     self._round_starts)
            report = audit_miner(self.transfer, self.run, hoplog, hotkey, self.s.device,
                                 self.s.audit_max_seconds, inputs=inputs)
            passed, reason, seconds = report.passed, report.reason, report.seconds
            if report.status == "incomplete":
                self.audits.incomplete += 1
                log.info("audit of %s round %d incomplete: %s", hotkey[:10], rnd, self._why(reason, rnd))
                return True
            if report.status in ("uncalibrated", "inconclusive"):  # no verdict: nobody is penalised
                self._withheld(rnd, hotkey, report)
                return True
        except ClaimError as exc:
            passed, reason, seconds = False, str(exc), 0.0
        except DataError as exc:  # our copy of the run's data cannot be read: not the miner's fault
            self.audits.incomplete += 1
            log.warning("audit of %s round %d incomplete: %s", hotkey[:10], rnd, exc)
            return True
        except (OuterError, WorkerError, ValueError) as exc:  # the miner's objects do not load
            passed, reason, seconds = False, f"{type(exc).__name__}: {exc}", 0.0
        except (TransferError, BridgeError) as exc:  # our side could not fetch: not the miner's fault
            self.audits.incomplete += 1
            log.warning("audit of %s round %d incomplete: %s", hotkey[:10], rnd, self._why(str(exc), rnd))
            return True
        self.audits.runs += 1
        self.audits.seconds += seconds
        self.audits.verdicts.append((rnd, hotkey, passed, reason))
        if not passed:
            self.audits.failed += 1
        self.book.record_audit(hotkey, rnd, passed, reason)
        log.info("audit of %s round %d: %s%s (%.2fs)", hotkey[:10], rnd, "PASS" if passed else "FAIL",
                 "" if passed else f" - {reason}", seconds)
        return passed

    def _withheld(self, rnd: int, hotkey: str, report) -> None:
        self.audits.withheld += 1
        first = report.status == "uncalibrated" and report.context not in self.audits.uncalibrated
        if report.status == "uncalibrated":
            self.audits.uncalibrated.add(report.context)
        (log.warning if first else log.info)("audit of %s round %d %s, penalty withheld: %s", hotkey[:10], rnd,
                                             report.status.upper(), report.reason)

    # ----- weights -----
    def maybe_set_weights(self) -> bool:
        """Set weights if the chain's rate limit allows; otherwise keep the window open (deferred)."""
        me = self.keypair.ss58_address
        since, limit = self.chain.blocks_since_last_update(me), self.chain.weights_rate_limit()
        if since is not None and since < limit:
            log.debug("weights deferred: %d of %d blocks since the last update", since, limit)
            return False
        if self.pending_weights is None:  # close the window once; a failed set retries the same weights
            mg = self.chain.metagraph()
            self.book.close_window()
            uid_scores = {mg.uid_of(hk): s for hk, s in self.book.scores().items() if mg.uid_of(hk) is not None}
            owner_uid = mg.uid_of(mg.owner_hotkey)
            uids, weights = compute_weights(uid_scores, [n.uid for n in mg.neurons], owner_uid, self.params.burn_share)
            self.pending_weights = [list(uids), list(weights)]
            self._save()
        uids, weights = self.pending_weights
        result = self.chain.set_weights(self.keypair, uids, weights, version_key=self.run.version_key)
        if result.status != "ok":
            log.warning("set_weights %s: %s (blocks left %s); will retry", result.status, result.message,
                        result.blocks_left)
            return False
        self.pending_weights = None
        self.weights_set += 1
        self._weights_done(uids, weights)
        self.pending_window = False
        self._save()
        log.info("weights set at block %d (version %d, %d windows): %s", self.chain.current_block(),
                 self.run.version_key, self.book.window, " ".join(f"uid{u}={w:.4f}" for u, w in zip(uids, weights)))
        return True

    def _weights_done(self, uids: list, weights: list) -> None:
        """Remember the weights just set, count them in metrics and publish them to the dashboard."""
        self.last_weights = dict(zip(uids, weights))
        if self.on_weights is not None:
            self.on_weights(uids, weights)
        self.publisher.weights_set(self.next_round - 1, self.book, self.chain.metagraph(), uids, weights)

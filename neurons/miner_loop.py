"""The miner's work loop: lease hops, compute them, upload, report; step and merge when told.

Network and compute overlap: while the last hop of a lease computes, the next lease is already
long-polling the bridge and its inputs start downloading the moment it answers; outputs encode,
upload and report `done` on a background pool, bounded so memory stays flat. The loop drains
pending uploads before anything that changes weights (step, merge). `max_open_graphs` bounds the
forward graphs held (the bridge hands out no pooled forward beyond it), so a large step quota A
keeps every stage busy without holding A graphs. Every second of the loop is booked in a
`TimeBook` (neurons/timebook.py): the status line, the status file and the metrics show it.
The last hop's `done` and every `step_done` also ask for the next lease when the lease asked
ahead found none, so the answer to a report is the next work: one round trip where there were two.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import torch

from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.lifecycle import HopKind
from protocol.messages import (Assignment, Hop, HopDone, HopFail, LeaseRequest, LeaseResponse,
                               RegisterRequest, StepDone)
from resbm import codec, data
from resbm.config import ModelConfig
from neurons import hop_exec
from neurons.audit_tolerances import device_gpu
from neurons.dataset_http import HttpSource
from neurons.objects import BadInput, HopInputs, encode_output, fetch_inputs
from neurons.round_merge import ReplicaMerge, RoundState
from neurons.sync_choice import sync_for
from neurons.stage_worker import StageWorker, global_inner_step, worker_for_run
from neurons.status import MinerStatus
from neurons.sync_device import pick_sync_device
from neurons.timebook import TimeBook
from neurons.transfer import ObjectTransfer, TransferError

__all__ = ["Miner"]


def _no_work(resp: LeaseResponse | None) -> bool:
    """A lease answer that gave nothing to do yet (none, or `wait`)."""
    return resp is None or resp.action == "wait"

log = logging.getLogger("miner")


class Miner:
    """Serves the stage the bridge assigns, until stopped."""

    def __init__(self, client: BridgeClient, transfer: ObjectTransfer, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_hops: int = 4, max_pending_uploads: int = 8,
                 max_open_graphs: int = 0, max_memory: int | str | None = "auto"):
        self.client, self.transfer = client, transfer
        self.device, self.dtype = device, dtype
        self.max_memory = max_memory  # activation budget: neurons.stage_memory.parse_memory
        self.max_hops, self.max_pending = max_hops, max_pending_uploads
        self.max_open_graphs = max_open_graphs
        self.lease_wait_ms = 2000
        self.prefetch_wait_ms = 500  # a hand-off arrives well within this; stopping waits at most this
        self.prefetch_leases = True
        self._lease_pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._prefetch: Future | None = None
        self._prefetched: dict[str, Future] = {}  # hop id -> its inputs, downloading since the prefetch
        self.carry_leases = True  # the last hop's `done` (and `step_done`) also asks for the next hops
        self._carried: list[LeaseResponse] = []  # lease answers that came with a done or step report
        self._asking: Future | None = None  # the upload whose `done` may bring the next lease
        self.stop = threading.Event()
        self.book = TimeBook()
        self.status = MinerStatus(transfer.stats, self.book)
        self._fwd_taken = 0  # hops that ran a forward in this inner step (what the bridge's quota counts)
        self._downloads = ThreadPoolExecutor(4, thread_name_prefix="download")
        self._uploads = ThreadPoolExecutor(2, thread_name_prefix="upload")
        self._pending: list[Future] = []
        self.worker: StageWorker | None = None
        self.run = None  # the RunConfig, from registration
        self._sync_device: torch.device | None = None  # where the sharded sync computes (chosen once)
        self.state: RoundState | None = None
        self._computed: tuple | None = None  # (sha, theta, momentum) of our last merge
        self._merge_tried: int | None = None  # round whose merge we already attempted
        self._last_step: tuple | None = None  # ((round, inner_step), samples) of the last step taken

    def _round_merge(self) -> ReplicaMerge:
        return sync_for(self.run).merge_for(self.client, self.transfer, self.worker, self.run, self.stop,
                                            self._pick_sync_device)

    def _pick_sync_device(self) -> torch.device:
        """Where the sharded sync computes: chosen once, by a self-check of the device's arithmetic."""
        if self._sync_device is None:
            self._sync_device = pick_sync_device(self.device)
        return self._sync_device

    # ----- setup -----
    def register(self) -> Assignment:
        """Register with the bridge, build the stage and load the round's weights."""
        with self.book.timed("setup"):
            return self._register()

    def _register(self) -> Assignment:
        self._fwd_taken = 0
        a = self._post_registration(self._registration())
        run = a.run
        cfg = ModelConfig.from_dict(run.model)
        dataset = data.open_run_dataset(run.dataset, self.client.dataset_url, HttpSource)  # fetches the manifest
        if cfg.vocab_size != dataset.vocab_size:
            raise ValueError(f"run model.vocab_size={cfg.vocab_size} but the dataset's vocab is "
                             f"{dataset.vocab_size}: the bridge's run config is wrong")
        same = self.worker is not None and self.worker.stage_index == a.stage and self.run == run
        if not same:
            self.worker = worker_for_run(run, a.stage, self.device, self.dtype, self.max_memory)
        self.run, self.cfg, self.stage = run, cfg, a.stage
        self.shape = tuple(cfg.code_shape(run.batch_size))
        self.codec = cfg.wire_codec
        self.out_bytes = codec.wire_size(self.shape, self.codec)
        init = (lambda: worker_for_run(run, a.stage, "cpu").theta()) if same else None  # built fresh: init already
        self.state = sync_for(run).load_state(self.worker, a, self.client, self.transfer, run, self._computed, init)
        self.status.set_stage(a.stage, a.round)
        return a

    def _registration(self) -> RegisterRequest:
        """What this miner declares: the numerics (and GPU model) its audits are replayed and judged in."""
        return RegisterRequest(device_class=torch.device(self.device).type,
                               compute_dtype=str(self.dtype).removeprefix("torch."),
                               device_name=device_gpu(self.device))

    def _post_registration(self, req: RegisterRequest, patience: float = 30.0) -> Assignment:
        """POST register; a 403 `not_allowed` right after a chain registration means the bridge's
        metagraph snapshot is older than it (the miss makes it refresh): retry for a while."""
        end = time.monotonic() + patience
        while True:
            try:
                return self.client.register(req)
            except BridgeError as exc:
                if exc.status != 403 or "not_allowed" not in exc.detail or time.monotonic() > end:
                    raise
                log.info("the bridge has not seen this hotkey's registration yet; retrying")
                self.stop.wait(1.0)

    # ----- main loop -----
    def run_forever(self) -> None:
        """Lease and serve until `stop` is set or the bridge says the run is done."""
        # wait_ms: the bridge holds an idle lease until work appears (long-poll) instead of us polling.
        req = LeaseRequest(max_hops=self.max_hops, wait_ms=self.lease_wait_ms,
                           fwd_out_bytes=0 if self.worker.is_last else self.out_bytes,
                           bwd_out_bytes=0 if self.worker.is_first else self.out_bytes,
                           max_open_graphs=self.max_open_graphs)
        self._req = req
        outage = 0.0
        while not self.stop.is_set():
            t0, quota_used = time.monotonic(), self._quota_used()
            try:
                resp = self._next_lease()
                outage = 0.0
            except (BridgeError, httpx.TransportError) as exc:
                # The bridge may be restarting: keep trying, backing off up to 10 s, never exit.
                outage = min(10.0, max(1.0, 2 * outage))
                log.warning("lease failed (%s); retrying in %.0fs", exc, outage)
                self.stop.wait(outage)
                continue
            self._book_lease(resp, time.monotonic() - t0, quota_used)
            self.status.maybe_print(resp.round, resp.inner_step)
            if self.state is not None and resp.round > self.state.round and resp.action in ("work", "step", "wait"):
                try:  # the run moved past our round (we missed a publication): catch up
                    self._drain()
                    self.register()
                except (BridgeError, TransferError, httpx.TransportError) as exc:
                    log.warning("catching up to round %d failed (%s); retrying", resp.round, exc)
                    self.stop.wait(1.0)
                except Exception:  # e.g. a published object that does not load: never die on it
                    log.exception("catching up to round %d failed unexpectedly; retrying in 5 s", resp.round)
                    self.stop.wait(5.0)
                continue
            if self.state is not None and resp.round < self.state.round and resp.action != "done":
                with self.book.timed("merge"):
                    self.stop.wait(0.2)  # our stage already merged; other stages are still merging
                continue
            try:
                self._act(resp)
            except (BridgeError, TransferError, httpx.TransportError) as exc:  # the bridge re-offers it
                log.warning("%s failed: %s; retrying", resp.action, exc)
                self.stop.wait(1.0)
            except Exception:  # never die on one bad action: log it whole, back off, carry on
                log.exception("%s failed unexpectedly; retrying in 5 s", resp.action)
                self.stop.wait(5.0)
            if resp.action == "done":
                log.info("the bridge says the run is done")
                break
        self._drain()

    def _quota_used(self) -> bool:
        """Whether this inner step's forwards are all taken (what is left is its backwards)."""
        return self.run is not None and self._fwd_taken >= self.run.micro_batches_per_step

    def _waiting_as(self, resp: LeaseResponse, quota_used: bool) -> str:
        """What waiting for work counts as: the inner-step barrier once the step's quota is used,
        else waiting for other stages (or for their merge, when our round is ahead)."""
        if self.state is not None and resp.round < self.state.round:
            return "merge"
        return "barrier" if quota_used else "wait_work"

    def _book_lease(self, resp: LeaseResponse, seconds: float, quota_used: bool) -> None:
        """Book a lease call: the time the bridge held it (long-poll) as waiting, the rest as the
        round trip."""
        parked = min(seconds, resp.parked_ms / 1000.0)
        if parked > 0:
            self.book.add(self._waiting_as(resp, quota_used), parked)
        self.book.add("lease" if resp.action != "wait" else self._waiting_as(resp, quota_used), seconds - parked)

    def _act(self, resp: LeaseResponse) -> None:
        """Carry out one lease answer."""
        if resp.action == "work":
            self._work(resp.hops)
        elif resp.action == "wait":
            self._drain()
            with self.book.timed(self._waiting_as(resp, self._quota_used())):
                # A long-poll already waited at the bridge (retry_after 0): ask again at once.
                if resp.retry_after > 0:
                    self.stop.wait(min(resp.retry_after, 2.0))
        elif resp.action == "step":
            self._step(resp)
        elif resp.action == "merge":
            self._drain()
            with self.book.timed("merge"):
                if self._merge_tried == resp.round:  # done what we could; the stage publishes without us
                    self.stop.wait(0.3)
                    return
                self.state, self._computed = self._round_merge().run_round(self.state, resp.round)
                self._merge_tried = resp.round
            self.status.set_stage(self.stage, self.state.round)
        elif resp.action == "reassign":
            self._drain()
            self.register()

    def close(self) -> None:
        """Finish uploads and release thread pools."""
        self.carry_leases = False  # reports of the hops finished below ask for nothing more
        self._drain()
        for resp in [self._take_prefetched(), *self._carried]:
            if resp is not None:  # hops leased ahead of time are finished, not left to expire
                self._work(resp.hops)
                self._drain()
        self._carried.clear()
        self._prefetched.clear()
        self._lease_pool.shutdown(wait=True)
        self._downloads.shutdown(wait=True)
        self._uploads.shutdown(wait=True)

    # ----- hops -----
    def _lease_ahead(self) -> LeaseResponse | None:
        """The next lease answer, asked while the current hop computes (held at the bridge up to
        `prefetch_wait_ms`, so work that appears meanwhile starts downloading at once; a longer
        wait is the main loop's own long-poll); None on an error."""
        try:
            resp = self.client.lease(self._req.model_copy(update={"wait_ms": min(self.lease_wait_ms,
                                                                                 self.prefetch_wait_ms)}))
        except (BridgeError, httpx.TransportError):
            return None
        # Start the inputs downloading at once: they are the next thing the GPU needs.
        for h in resp.hops:
            self._prefetched[h.hop_id] = self._downloads.submit(fetch_inputs, self.transfer, h, self.shape, self.codec)
        return resp

    def _next_lease(self) -> LeaseResponse:
        """The next lease answer: one leased ahead with work, else one a report carried back, else
        the lease ahead's `wait` or a fresh lease."""
        resp = self._take_prefetched()
        if not _no_work(resp):
            return resp
        if self._asking is not None:
            fut, self._asking = self._asking, None
            fut.result()  # its `done` may carry the next hops: wait for it rather than lease twice
        if self._carried:
            return self._carried.pop(0)
        return resp or self.client.lease(self._req)

    def _lease_with(self) -> LeaseRequest | None:
        """What a report asks for along the way: a lease that is answered at once."""
        return self._req.model_copy(update={"wait_ms": 0}) if self.carry_leases else None

    def _keep_carried(self, resp: LeaseResponse | None) -> None:
        if resp is not None and resp.action != "wait":  # on `wait` the loop's long-poll does better
            for h in resp.hops:  # start the inputs downloading, as for a lease asked ahead
                self._prefetched[h.hop_id] = self._downloads.submit(fetch_inputs, self.transfer, h, self.shape, self.codec)
            self._carried.append(resp)

    def _take_prefetched(self) -> LeaseResponse | None:
        fut, self._prefetch = self._prefetch, None
        return fut.result() if fut is not None else None

    def _work(self, hops: list[Hop]) -> None:
        fetches = [self._prefetched.pop(h.hop_id, None)
                   or self._downloads.submit(fetch_inputs, self.transfer, h, self.shape, self.codec) for h in hops]
        self._fwd_taken += sum(1 for h in hops if h.kind != HopKind.BWD or h.recompute)
        for i, (hop, fut) in enumerate(zip(hops, fetches)):
            last = i == len(hops) - 1
            if last and self.prefetch_leases and not self.stop.is_set():
                # Ask for the next hops while the last one computes: the lease round trip and the
                # first download then overlap compute instead of idling the device.
                self._prefetch = self._lease_pool.submit(self._lease_ahead)
            try:
                with self.book.timed("download"):
                    inputs = fut.result()
            except BadInput as exc:
                self._report_bad_input(hop, exc)
                continue
            t0 = time.monotonic()
            try:
                out, loss = self._compute(hop, inputs)
            except Exception as exc:  # a worker error must not kill the miner: report and go on
                log.error("hop %s (%s sample %d) failed: %s", hop.hop_id, hop.kind, hop.sample_id, exc)
                self.worker.release(hop.sample_id)
                self._fail(hop, "other", str(exc)[:900])
                continue
            seconds = time.monotonic() - t0
            self.book.add("compute", seconds)
            self.status.add_compute(seconds, hop, self.run.batch_size * self.cfg.seq_len, loss)
            with self.book.timed("drain"):
                self._queue_upload(hop, out, loss, seconds, self._prefetch if last else False)

    def _compute(self, hop: Hop, inputs: HopInputs) -> tuple[torch.Tensor | None, float | None]:
        """The hop's output and loss, from the one hop executor the validator replays with."""
        run = self.run
        res = hop_exec.run_hop(self.worker, hop.kind, hop.sample_id, hop.recompute, inputs.act, inputs.grad,
                               hop_exec.PublicData(run.data_seed, run.batch_size, run.dataset))
        return res.out, res.loss

    def _queue_upload(self, hop: Hop, out: torch.Tensor | None, loss: float | None, seconds: float,
                      ahead: Future | None | bool = False) -> None:
        """`ahead`: False, or (the last hop of a lease) the lease asked ahead for the next hops, if any."""
        self._pending = [f for f in self._pending if not f.done()]
        while len(self._pending) >= self.max_pending:
            self._pending.pop(0).result()
        fut = self._uploads.submit(self._upload_and_report, hop, out, loss, seconds, ahead)
        self._pending.append(fut)
        if ahead is not False:
            self._asking = fut

    def _upload_and_report(self, hop: Hop, out: torch.Tensor | None, loss: float | None, seconds: float,
                           ahead: Future | None | bool = False) -> None:
        try:
            sha, size = None, 0
            if out is not None and hop.output is not None:
                with self.book.timed("encode"):
                    blob, sha = encode_output(out, self.codec)
                with self.book.timed("upload"):
                    self._put_output(hop, blob)
                size = len(blob)
            # The last hop of a lease asks for the next ones too, unless the lease asked ahead found some.
            ask = ahead is not False and (ahead is None or (ahead.done() and _no_work(ahead.result())))
            with self.book.timed("report"):
                self._report_done(hop, HopDone(hop_id=hop.hop_id, sha256=sha, size=size, loss=loss,
                                               compute_seconds=seconds, lease=self._lease_with() if ask else None))
            self.status.hops_done += 1
        except (TransferError, BridgeError, httpx.TransportError) as exc:
            # The lease will expire and the bridge re-leases the hop elsewhere.
            log.warning("hop %s not reported: %s", hop.hop_id, exc)
        except codec.CodecError as exc:  # our own output is unencodable (e.g. NaN): never crash on it
            log.error("hop %s: output cannot be encoded (%s); reporting the hop as failed", hop.hop_id, exc)
            self._fail(hop, "other", f"output not encodable: {exc}")

    def _report_done(self, hop: Hop, done: HopDone) -> None:
        # The gradient of a backward is already accumulated here: a report lost to a bridge
        # restart would leave work the bridge never counts, so retry until the lease ends.
        while True:
            try:
                self._keep_carried(self.client.hop_done(done).lease)
                return
            except (httpx.TransportError, BridgeError) as exc:
                transient = not isinstance(exc, BridgeError) or exc.status in (429, 500, 502, 503, 504)
                if not transient or time.time() >= hop.deadline or self.stop.is_set():
                    raise
                log.warning("hop %s: bridge unreachable (%s); retrying its report until the lease ends",
                            hop.hop_id, str(exc)[:120])
                self.stop.wait(1.0)

    def _put_output(self, hop: Hop, blob: bytes) -> None:
        """Upload a hop's encoded output to the lease's presigned PUT."""
        self.transfer.put(hop.output.put_url, blob)

    def _report_bad_input(self, hop: Hop, exc: BadInput) -> None:
        log.warning("hop %s: bad input (%s), reporting it", hop.hop_id, exc)
        self.status.bad_inputs += 1
        if hop.kind == HopKind.BWD and not hop.recompute:
            self.worker.release(hop.sample_id)
        self._fail(hop, exc.reason, exc.detail)

    def _fail(self, hop: Hop, reason: str, detail: str) -> None:
        try:
            self.client.hop_fail(HopFail(hop_id=hop.hop_id, reason=reason, detail=detail[:1000]))
        except BridgeError as exc:
            log.warning("could not report failure of hop %s: %s", hop.hop_id, exc)

    def _drain(self) -> None:
        with self.book.timed("drain"):
            for f in self._pending:
                f.result()
            self._pending.clear()

    # ----- inner step -----
    def _apply_step(self, global_step: int) -> None:
        """Take the inner optimizer step over the accumulated gradients."""
        self.worker.inner_step(global_step)

    def _step(self, resp: LeaseResponse) -> None:
        self._drain()
        with self.book.timed("step"):
            self._step_now(resp)
        self._fwd_taken = 0

    def _step_now(self, resp: LeaseResponse) -> None:
        key = (resp.round, resp.inner_step)
        if self._last_step is not None and self._last_step[0] == key:
            # Asked again for a step we already took (our report was lost): report it, never re-apply.
            self.client.step_done(StepDone(round=resp.round, inner_step=resp.inner_step,
                                          samples=self._last_step[1]))
            return
        w = self.worker
        samples = counted = w.samples_since_step
        if resp.step_samples and resp.step_samples != samples:
            # The bridge's count wins at steps/done (it answers 409 otherwise): a mismatch means a
            # hop we computed was not reported, or one was reported that we did not compute.
            log.warning("round %d step %d: %d samples accumulated here, the bridge counted %d",
                        resp.round, resp.inner_step, samples, resp.step_samples)
            self.status.step_mismatches += 1
            counted = resp.step_samples
        step = global_inner_step(resp.round, self.run.inner_steps_per_round, resp.inner_step)
        for sid in w.close_inner_step(step, self._apply_step):  # the bridge holds no open graph for us
            log.warning("dropped forward graph of sample %d (abandoned by the bridge)", sid)
        self.state.samples += samples
        self._last_step = (key, counted)
        self.status.record_step(key)
        ack = self.client.step_done(StepDone(round=resp.round, inner_step=resp.inner_step, samples=counted,
                                             lease=self._lease_with()))
        self._keep_carried(ack.lease)

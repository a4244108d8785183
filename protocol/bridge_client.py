"""`BridgeClient`: one typed method per bridge route, signed by `SignedClient`, answers as models."""
from __future__ import annotations

import time
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ValidationError

from protocol import integrity as integ
from protocol import messages as msg
from protocol import sync_api as sync
from protocol.client import BridgeError, SignedClient
from protocol.console import ValidationLossReport, ValidatorReport
from protocol.model_messages import ModelQuery, PublishedModel
from protocol.routes import Route, route

__all__ = ["BridgeClient", "dataset_files_url"]

M = TypeVar("M", bound=BaseModel)


def dataset_files_url(bridge_url: str) -> str:
    """Where the bridge at `bridge_url` serves its run's dataset files (redirects to presigned S3 GETs)."""
    return bridge_url.rstrip("/") + route("dataset_file").target(name="")


class BridgeClient(SignedClient):
    """A `SignedClient` that knows the route table: `client.lease(req)` -> `LeaseResponse`.

    `on_call(route_name, req, answer_or_None, t0, t1, ok, tries)`, when set, hears of every call
    as it ends (the miner's request counters); it must be quick and must not raise."""

    on_call = None

    def call(self, r: Route, req: Optional[BaseModel] = None) -> Any:
        """Send `req` on route `r` and validate the answer as the route's response model."""
        if r.request is not None and not isinstance(req, r.request):
            raise TypeError(f"{r.name} takes a {r.request.__name__}, got {type(req).__name__}")
        if self.on_call is None:
            return self._call(r, req)
        t0, answer = time.monotonic(), None
        try:
            answer = self._call(r, req)
            return answer
        finally:
            self.on_call(r.name, req, answer, t0, time.monotonic(), answer is not None, self.last_tries)

    def _call(self, r: Route, req: Optional[BaseModel]) -> Any:
        if r.method == "GET":
            params = None
            if req is not None:
                params = {k: v for k, v in req.model_dump(exclude_none=True).items()
                          if k not in r.path_params} or None
            data = self.get(r.target(req), params=params)
        else:
            data = self.post(r.target(req), req)
        if r.response is None:
            return data
        try:
            return r.response.model_validate(data)
        except ValidationError as exc:
            raise BridgeError(200, f"{r.method} {r.path}: answer is not a "
                              f"{r.response.__name__}: {exc}"[:2000]) from None

    @property
    def dataset_url(self) -> str:
        """Where the bridge serves the run's dataset files (`GET /v1/dataset/{name}` redirects to
        presigned S3 GETs): the `files_url` of `resbm.data.open_run_dataset`."""
        return dataset_files_url(self.base_url)

    # ---- everyone registered -----------------------------------------------------------
    def run_info(self) -> msg.RunInfo:
        """`GET /v1/run`: the run config and the bridge hotkey."""
        return self.call(route("run"))

    def metrics(self) -> msg.Metrics:
        """`GET /v1/metrics`: per-stage and per-miner counters."""
        return self.call(route("metrics"))

    # ---- miners ------------------------------------------------------------------------
    def register(self, req: msg.RegisterRequest) -> msg.Assignment:
        """Join (or re-join) the run; the bridge assigns a stage."""
        return self.call(route("register"), req)

    def leave(self, req: msg.LeaveRequest) -> msg.LeaveResponse:
        """Leave the run; queued hops move to other replicas."""
        return self.call(route("leave"), req)

    def lease(self, req: msg.LeaseRequest) -> msg.LeaseResponse:
        """Lease hops (or learn what to do instead)."""
        return self.call(route("lease"), req)

    def hop_done(self, req: msg.HopDone) -> msg.HopDoneAck:
        """Report a hop's uploaded output (and, with `req.lease`, lease the next hops in the same call)."""
        return self.call(route("hop_done"), req)

    def hop_fail(self, req: msg.HopFail) -> msg.Ack:
        """Release a hop that could not be computed (a claim about its inputs)."""
        return self.call(route("hop_fail"), req)

    def step_done(self, req: msg.StepDone) -> msg.StepAckLease:
        """Report an optimizer step (and, with `req.lease`, lease the next hops in the same call)."""
        return self.call(route("step_done"), req)

    def upload(self, req: msg.UploadRequest) -> msg.UploadGrant:
        """A presigned PUT for a pseudo-gradient or merged state."""
        return self.call(route("upload"), req)

    def pseudograd(self, req: msg.PseudogradReport) -> msg.Ack:
        """Report an uploaded pseudo-gradient."""
        return self.call(route("pseudograd"), req)

    def merge_set(self, round: int, stage: int) -> msg.MergeSet:
        """The frozen merge set of a stage's round (409 `not_frozen` until frozen)."""
        return self.call(route("merge_set"), msg.StageRound(round=round, stage=stage))

    def shard_plan(self, round: int, stage: int) -> msg.ShardPlan:
        """Which replicas merge which shard of a stage's round."""
        return self.call(route("shard_plan"), msg.StageRound(round=round, stage=stage))

    def merged(self, req: msg.MergedReport) -> msg.MergedAck:
        """Vote for a merged state (repeat to poll for publication)."""
        return self.call(route("merged"), req)

    # ---- the sharded sync (run config sync_mode: sharded) -----------------------------------
    def sync_upload(self, req: sync.SyncUpload) -> msg.UploadGrant:
        """A presigned PUT to the caller's staging key for one shard object (a piece or a merged update)."""
        return self.call(route("sync_upload"), req)

    def sync_pseudograd(self, req: sync.SyncPseudograd) -> msg.Ack:
        """Report the caller's pseudo-gradient pieces (one sha256 and size per shard)."""
        return self.call(route("sync_pseudograd"), req)

    def sync_view(self, round: int, stage: int) -> sync.SyncView:
        """Everything about a stage's sharded round: start checkpoint, decided updates, pieces, votes."""
        return self.call(route("sync_view"), msg.StageRound(round=round, stage=stage))

    def sync_votes(self, req: sync.SyncVotes) -> sync.SyncVotesAck:
        """Vote the caller's merged shards (the empty object's sha256 votes "keep")."""
        return self.call(route("sync_votes"), req)

    def model(self, round: Optional[int] = None) -> PublishedModel:
        """Which weights round `round` (None: the latest) published: one object per stage."""
        return self.call(route("model"), ModelQuery(round=round))

    # ---- validators --------------------------------------------------------------------
    def hoplog(self, round: int, hotkey: Optional[str] = None) -> msg.HopLog:
        """The done hops, states, merge sets and votes of a round."""
        return self.call(route("hoplog"), msg.HopLogQuery(round=round, hotkey=hotkey))

    def disputes(self) -> integ.DisputeList:
        """Open merge disputes awaiting arbitration."""
        return self.call(route("disputes"))

    def arbitrate(self, req: integ.Arbitration) -> integ.ArbitrationAck:
        """The validator's replayed merge result for a dispute."""
        return self.call(route("arbitrate"), req)

    def verdicts(self, req: integ.VerdictReport) -> integ.VerdictAck:
        """Audit verdicts of a round (failures quarantine miners)."""
        return self.call(route("verdicts"), req)

    def validator_report(self, req: ValidatorReport) -> msg.Ack:
        """Publish audit verdicts, scores and weights for the dashboard."""
        return self.call(route("validator_report"), req)

    def validation_loss(self, req: ValidationLossReport) -> msg.Ack:
        """A validator's held-out loss of the model a round published."""
        return self.call(route("validation_loss"), req)

    def sync_disputes(self) -> sync.SyncDisputes:
        """Disputed shards of the sharded sync awaiting a validator's recomputation."""
        return self.call(route("sync_disputes"))

    def sync_arbitrate(self, req: sync.ShardArbitration) -> msg.Ack:
        """The sha256 a validator's recomputation of a disputed shard reached."""
        return self.call(route("sync_arbitrate"), req)

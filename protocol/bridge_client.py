"""`BridgeClient`: one typed method per bridge route, signed by `SignedClient`, answers as models."""
from __future__ import annotations

import time
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ValidationError

from protocol import integrity as integ
from protocol import messages as msg
from protocol.client import BridgeError, SignedClient
from protocol.console import ValidatorReport
from protocol.routes import Route, route

__all__ = ["BridgeClient"]

M = TypeVar("M", bound=BaseModel)


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

    def hop_done(self, req: msg.HopDone) -> msg.Ack:
        """Report a hop's uploaded output."""
        return self.call(route("hop_done"), req)

    def hop_fail(self, req: msg.HopFail) -> msg.Ack:
        """Release a hop that could not be computed (a claim about its inputs)."""
        return self.call(route("hop_fail"), req)

    def step_done(self, req: msg.StepDone) -> msg.StepAck:
        """Report an optimizer step."""
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

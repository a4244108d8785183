"""Every bridge route in one table: method, path template, request and response models, role.

The bridge registers its routes from this table and `protocol.bridge_client.BridgeClient` calls
them from it, so a path, a model or a role is written down exactly once. A route's request model
is its JSON body (POST) or its path and query parameters (GET); `None` means the route answers
something that is not a message (a redirect, HTML, Prometheus text).

Roles: `public` (unsigned), `registered` (any metagraph hotkey), `miner` (registered, without a
validator permit), `validator` (with a validator permit)."""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal, Optional

from pydantic import BaseModel

from protocol import integrity as integ
from protocol import messages as msg
from protocol import sync_api as sync
from protocol.console import ValidationLossReport, ValidatorReport
from protocol.model_messages import ModelQuery, PublishedModel

__all__ = ["Role", "Route", "ROUTES", "BY_NAME", "route"]

Role = Literal["public", "registered", "miner", "validator"]


@dataclass(frozen=True)
class Route:
    """One bridge route; `fast` routes are also answered by the bridge's ASGI fast path."""

    name: str
    method: Literal["GET", "POST"]
    path: str
    request: Optional[type[BaseModel]]
    response: Optional[type[BaseModel]]
    role: Role
    fast: bool = False
    in_schema: bool = True
    path_params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(f for _, f, _, _ in string.Formatter().parse(self.path) if f)
        object.__setattr__(self, "path_params", names)

    def target(self, req: Optional[BaseModel] = None, **params: object) -> str:
        """The concrete path: path parameters from `req`'s fields, or given by name."""
        if not self.path_params:
            return self.path
        return self.path.format(**{p: params[p] if p in params else getattr(req, p)
                                   for p in self.path_params})


ROUTES: tuple[Route, ...] = (
    Route("health", "GET", "/health", None, msg.Health, "public"),
    Route("run", "GET", "/v1/run", None, msg.RunInfo, "registered"),
    Route("metrics", "GET", "/v1/metrics", None, msg.Metrics, "registered"),
    Route("dataset_file", "GET", "/v1/dataset/{name}", msg.DatasetFile, None, "public"),
    Route("dashboard_page", "GET", "/", None, None, "public", in_schema=False),
    Route("dashboard", "GET", "/v1/dashboard", None, None, "public"),
    Route("prometheus", "GET", "/metrics", None, None, "public", in_schema=False),
    Route("model", "GET", "/v1/model", ModelQuery, PublishedModel, "public"),
    Route("register", "POST", "/v1/miners/register", msg.RegisterRequest, msg.Assignment,
          "miner"),
    Route("leave", "POST", "/v1/miners/leave", msg.LeaveRequest, msg.LeaveResponse, "miner"),
    Route("lease", "POST", "/v1/hops/lease", msg.LeaseRequest, msg.LeaseResponse, "miner",
          fast=True),
    Route("hop_done", "POST", "/v1/hops/done", msg.HopDone, msg.Ack, "miner", fast=True),
    Route("hop_fail", "POST", "/v1/hops/fail", msg.HopFail, msg.Ack, "miner"),
    Route("step_done", "POST", "/v1/steps/done", msg.StepDone, msg.StepAck, "miner"),
    Route("upload", "POST", "/v1/rounds/upload", msg.UploadRequest, msg.UploadGrant, "miner"),
    Route("pseudograd", "POST", "/v1/rounds/pseudograd", msg.PseudogradReport, msg.Ack, "miner"),
    Route("merge_set", "GET", "/v1/rounds/{round}/stages/{stage}/pseudograds", msg.StageRound,
          msg.MergeSet, "miner"),
    Route("shard_plan", "GET", "/v1/rounds/{round}/stages/{stage}/shards", msg.StageRound,
          msg.ShardPlan, "miner"),
    Route("merged", "POST", "/v1/rounds/merged", msg.MergedReport, msg.MergedAck, "miner"),
    Route("hoplog", "GET", "/v1/validator/hoplog", msg.HopLogQuery, msg.HopLog, "validator"),
    Route("disputes", "GET", "/v1/validator/disputes", None, integ.DisputeList, "validator"),
    Route("arbitrate", "POST", "/v1/validator/arbitrate", integ.Arbitration,
          integ.ArbitrationAck, "validator"),
    Route("verdicts", "POST", "/v1/validator/verdicts", integ.VerdictReport, integ.VerdictAck,
          "validator"),
    Route("validator_report", "POST", "/v1/validator/report", ValidatorReport, msg.Ack,
          "validator"),
    Route("validation_loss", "POST", "/v1/validator/validation", ValidationLossReport, msg.Ack,
          "validator"),
    # the sharded sync (run config sync_mode: sharded; protocol/sync_api.py)
    Route("sync_upload", "POST", "/v1/sync/upload", sync.SyncUpload, msg.UploadGrant, "miner"),
    Route("sync_pseudograd", "POST", "/v1/sync/pseudograd", sync.SyncPseudograd, msg.Ack, "miner"),
    Route("sync_view", "GET", "/v1/rounds/{round}/stages/{stage}/sync", msg.StageRound,
          sync.SyncView, "registered"),
    Route("sync_votes", "POST", "/v1/sync/votes", sync.SyncVotes, sync.SyncVotesAck, "miner"),
    Route("sync_disputes", "GET", "/v1/validator/sync/disputes", None, sync.SyncDisputes,
          "validator"),
    Route("sync_arbitrate", "POST", "/v1/validator/sync/arbitrate", sync.ShardArbitration, msg.Ack,
          "validator"),
)

BY_NAME: dict[str, Route] = {r.name: r for r in ROUTES}


def route(name: str) -> Route:
    """The route called `name` (KeyError naming the known routes otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no bridge route {name!r}; known: {sorted(BY_NAME)}") from None

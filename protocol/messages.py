"""Wire messages of the bridge API (pydantic v2): every request and response body, and RunConfig.

Every model forbids unknown fields and bounds every string, list and number, so a malformed
body fails validation with an error that names the field. Times are unix seconds (float).

Conventions the miner relies on:
- `LeaseResponse.action`: `work` (hops attached), `wait` (retry after `retry_after`), `step`
  (take an optimizer step, then `POST /v1/steps/done`), `merge` (round over: upload the
  pseudo-gradient, merge, report), `reassign` (call `POST /v1/miners/register` again; also
  what to do whenever `LeaseResponse.state_sha` differs from the state you hold), `done`.
- `GET /v1/rounds/{r}/stages/{s}/pseudograds` answers 409 with `ErrorBody(error="not_frozen",
  retry_after=...)` until the merge set is frozen, then 200 with a `MergeSet`.
- Errors are `ErrorBody` JSON with the HTTP status (400 bad input, 401/403 auth, 404 unknown,
  409 conflict / wrong state, 413 body too large, 429 rate limited).

The models live in `protocol.wire_types` (shared vocabulary, object references, errors),
`protocol.hop_messages`, `protocol.round_messages` and `protocol.status_messages`; this module
re-exports them all so `from protocol.messages import X` names any wire model. Routes and their
models are listed in `protocol.routes`.
"""
from __future__ import annotations

from protocol import hop_messages, round_messages, status_messages
from protocol.hop_messages import *  # noqa: F401,F403 - the facade re-exports every model
from protocol.round_messages import *  # noqa: F401,F403
from protocol.run_config import RunConfig
from protocol.status_messages import *  # noqa: F401,F403
from protocol.wire_types import (PROTOCOL_VERSION, Ack, ComputeDtype, DeviceClass, ErrorBody,
                                 FailReason, HopKind, LeaseAction, ObjectRef, OutputRef, Phase,
                                 StateRef)

__all__ = ["PROTOCOL_VERSION", "Ack", "ComputeDtype", "DeviceClass", "ErrorBody", "FailReason",
           "HopKind", "LeaseAction", "ObjectRef", "OutputRef", "Phase", "StateRef", "RunConfig",
           *hop_messages.__all__, *round_messages.__all__, *status_messages.__all__]

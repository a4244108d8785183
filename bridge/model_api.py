"""The published model leaves the bridge: `GET /v1/model` (public: any round still kept, with
presigned GETs of every object and the sha256 its replicas voted for), a copy of the same in the
bucket after every round (`protocol.keys.ModelKey`, object keys in place of URLs, so
an export needs only read access to the bucket), and `POST /v1/validator/validation`, where
validators report the held-out loss of each round's model (the page and `/metrics` show the
median of their reports; a miner never reports a loss that is shown).
"""
from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from starlette.concurrency import run_in_threadpool

from bridge import model_view, views
from bridge.codespec import code_spec
from bridge.console_store import ConsoleStore
from bridge.records import TransitionError
from protocol.console import ValidationLossReport, validation_tokens
from protocol.messages import Ack, RunConfig
from protocol.keys import ModelKey
from protocol.model_messages import ModelQuery, ModelStage, PublishedModel, ValidationFigure
from protocol.sync_api import RoundUpdate

__all__ = ["ModelApi", "CACHE_SECONDS"]

log = logging.getLogger(__name__)
CACHE_SECONDS = 1.0


class ModelApi:
    """The model and validation-loss routes over a `BridgeService`, and the bucket copies."""

    def __init__(self, svc: Any, run: RunConfig, store: ConsoleStore, ttl: float,
                 training_loss: Callable[[int], Optional[float]]) -> None:
        self.svc, self.run, self.store, self.ttl = svc, run, store, ttl
        self.training_loss = training_loss
        self.seq_len = code_spec(run).shape[1]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="model-copy")
        self._latest_written = -1
        self._answers: dict[Optional[int], tuple[float, PublishedModel]] = {}
        svc.listeners.append(self._on_event)

    def data(self, round_: Optional[int]) -> dict[str, Any]:
        """model_view.model_data of a round (None: the latest), reading its next round's archive."""
        for attempt in range(2):  # the run may move on between the two reads: then read again
            r = round_ if round_ is not None else self.svc.read(model_view.latest_round)
            archive = self.svc.db.round_archive(r + 1) if r is not None else None
            try:
                return self.svc.read(lambda st: copy.deepcopy(model_view.model_data(st, r, archive)))
            except TransitionError as exc:
                if exc.code != "not_kept" or attempt:
                    raise
        raise AssertionError("unreachable")

    def message(self, d: dict[str, Any], sign: Callable[[str, float], str]) -> PublishedModel:
        """The wire form of `data(...)`, every object named by `sign(key, ttl)`."""
        stages = [ModelStage(
            stage=x["stage"], checkpoint_round=x["checkpoint_round"],
            state=None if x["state"] is None else views.state_ref(x["stage"], x["state"], sign, self.ttl),
            updates=[RoundUpdate(round=x["checkpoint_round"] + i,
                                 shards=[views.update_ref(u, sign, self.ttl) for u in shards])
                     for i, shards in enumerate(x["updates"])]) for x in d["stages"]]
        val = self.store.validation_at(d["round"])
        return PublishedModel(run=self.run, round=d["round"], latest=d["latest"], samples=d["samples"],
                              training_loss=self.training_loss(d["round"]),
                              validation=ValidationFigure(**val) if val else None, stages=stages)

    async def model(self, caller: None, req: ModelQuery) -> PublishedModel:
        """GET /v1/model: the model after a round (default: the latest), verifiable stage by stage.
        Answers are kept for a second per round, so a crowd of downloaders costs the bridge little."""
        hit = self._answers.get(req.round)
        if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
            return hit[1]
        d = await run_in_threadpool(self.data, req.round)
        out = await run_in_threadpool(self.message, d, self.svc.get_url)
        if len(self._answers) > 64:
            self._answers.clear()
        self._answers[req.round] = (time.monotonic(), out)
        return out

    async def validation_loss(self, caller: str, req: ValidationLossReport) -> Ack:
        """POST /v1/validator/validation: keep a validator's held-out loss of a published round."""
        latest = self.svc.read(model_view.latest_round)
        if latest is None or req.round > latest:
            raise TransitionError("not_published", f"round {req.round} has no published model yet")
        want = validation_tokens(self.run.val_tokens, self.seq_len)
        if want == 0:
            raise TransitionError("bad_tokens", "this run has the live validation loss off (val_tokens: 0)")
        if req.tokens != want:
            raise TransitionError("bad_tokens", f"tokens={req.tokens}, but this run evaluates every round on "
                                  f"{want} held-out tokens (val_tokens={self.run.val_tokens} in whole windows of "
                                  f"{self.seq_len}; the same windows for every validator)")
        await run_in_threadpool(self.store.add_validation, caller, req, time.time())
        return Ack()

    # ---- the bucket copy ----------------------------------------------------------------
    def _on_event(self, kind: str, arg: Any) -> None:
        if self.svc.storage is None:
            return
        if kind == "round_start" and int(arg) >= 1:
            self._pool.submit(self._copy_to_bucket, int(arg) - 1)
        elif kind == "run_done":
            self._pool.submit(self._copy_to_bucket, None)

    def _copy_to_bucket(self, round_: Optional[int]) -> None:
        try:
            d = self.data(round_)
            body = self.message(d, lambda key, ttl: key).model_dump_json(indent=1).encode()
            self.svc.storage.put(ModelKey(self.run.run_id, d["round"]).final, body)
            if d["round"] >= self._latest_written:
                self.svc.storage.put(ModelKey(self.run.run_id).final, body)
                self._latest_written = d["round"]
            log.info("round %d: published model described in the bucket at %s", d["round"],
                     ModelKey(self.run.run_id, d["round"]).final)
        except TransitionError as exc:
            log.info("no model to describe in the bucket for round %s: %s", round_, exc.message)
        except Exception:  # best effort: GET /v1/model still serves it, the next round tries again
            log.exception("writing the model description of round %s to the bucket failed", round_)

    def close(self) -> None:
        """Finish pending bucket copies."""
        self._pool.shutdown(wait=True)

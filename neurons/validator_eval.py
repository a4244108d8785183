"""The validator's live held-out loss: after each round, the model the round published, fetched
and verified as resbm-export does (neurons.model_fetch), evaluated on the run's fixed validation
windows (`val_tokens` of them in all, resbm.evaluate) and reported to the bridge, which shows the
median of validators' reports. The cost per round is bounded: one download of every stage's
state and `val_tokens` tokens of forward passes; `val_tokens: 0` in the run config turns it off.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import httpx
import torch

from neurons.model_fetch import ModelUnavailable, fetch_weights
from neurons.transfer import ObjectTransfer, TransferError
from protocol.client import BridgeError
from protocol.console import ValidationLossReport, validation_tokens
from protocol.messages import RunConfig
from protocol.model_messages import ModelQuery
from protocol.routes import route
from resbm.config import ModelConfig
from resbm.dataset import Dataset
from resbm.dataset_store import DataError
from resbm.evaluate import EvalResult, evaluate_lm, held_out_batches
from resbm.export import stitch
from resbm.model import ResBM

__all__ = ["LiveValidation"]

log = logging.getLogger("validator")


class LiveValidation:
    """Evaluates each published round's model on the run's validation windows and reports it."""

    def __init__(self, client: Any, transfer: ObjectTransfer, run: RunConfig, dataset: Dataset,
                 device: str = "cpu") -> None:
        self.client, self.transfer, self.run, self.dataset = client, transfer, run, dataset
        self.cfg = ModelConfig.from_dict(run.model)
        self.device = device
        self.tokens = validation_tokens(run.val_tokens, self.cfg.seq_len)
        self._batches: Optional[list] = None
        self.reported: dict[int, float] = {}  # round -> loss this validator reported

    def evaluate(self, rnd: int) -> EvalResult:
        """The held-out loss of the model after round `rnd` (raises when it cannot be had)."""
        pm = self.client.call(route("model"), ModelQuery(round=rnd))
        fetched = fetch_weights(self.transfer, pm)
        model = ResBM(self.cfg)
        model.load_state_dict(stitch(fetched.thetas, self.cfg))
        model.to(self.device).eval()
        if self._batches is None:
            self._batches = held_out_batches(self.dataset, self.tokens, self.cfg.seq_len)
        return evaluate_lm(lambda t: model(t), self._batches, device=self.device)

    def round_done(self, rnd: int) -> Optional[float]:
        """Evaluate and report round `rnd`'s model; None when off or not possible (logged)."""
        if self.tokens == 0:
            return None
        try:
            with torch.no_grad():
                result = self.evaluate(rnd)
            self.client.call(route("validation_loss"),
                             ValidationLossReport(round=rnd, loss=result.loss, tokens=result.tokens))
        except BridgeError as exc:
            log.info("round %d: no held-out loss reported (%s)", rnd, exc)
            return None
        except (ModelUnavailable, TransferError, DataError, ValueError, httpx.TransportError,
                torch.OutOfMemoryError) as exc:  # never stops auditing and scoring
            log.warning("round %d: the published model could not be evaluated: %s", rnd, exc)
            return None
        self.reported[rnd] = result.loss
        log.info("round %d: held-out loss of the published model %.4f on %d tokens", rnd, result.loss,
                 result.tokens)
        return result.loss

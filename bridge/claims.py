"""Claims about bad hop outputs, charged to the party the bridge can prove wrong (no I/O).

A consumer reports `hops/fail` with a reason. For `bad_hash`, `bad_shape`, `nonfinite` and
`missing` the I/O shell first looks at every input object of the hop at its sealed key (which
only the bridge wrote, at the producer's `done`) and passes one verdict per object in:

- an input is `bad` (its bytes do not have the sha256 the producer reported, or do not decode
  to the run's code shape, or are not finite): the producer is charged (failure, health, back
  off, `bad_outputs`), its hop is `rejected` and done again on another replica; the
  consumer's hop is closed at no cost to it, and the sample goes on.
- an input is `missing` (lost from the store after it was sealed): nobody is charged; the
  producer's hop is done again.
- every input is `ok` (or the hop has no recorded input to be bad): the claim is false; the
  consumer is charged (failure, health, back off, `false_claims`) and its hop is retried on
  another replica.
- `unchecked` (no object store configured): nobody is charged; the hop is retried elsewhere.

`other` (the consumer's own trouble) retries the hop elsewhere and costs a failure count only.
A sample is abandoned only when the hop that would be retried has used `max_attempts`.
"""
from __future__ import annotations

import logging
import random
from typing import Optional

from bridge import rounds
from bridge.dispatch import penalize, redo_hop, retry_hop
from bridge.records import Hop, ObjRef, Sample, State
from bridge.state import check_done, tick
from protocol.lifecycle import HopKind, HopStatus, SampleStatus

__all__ = ["Verdict", "disputed_inputs", "judge_claim", "reject_output"]

log = logging.getLogger(__name__)

Verdict = tuple[ObjRef, str, str]  # (input ref, ok|bad|missing|unchecked, detail)


def disputed_inputs(hop: Hop) -> list[ObjRef]:
    """The recorded input objects of `hop` that a bad-input claim can be about."""
    refs = []
    if hop.act_in is not None and (hop.kind.runs_forward or hop.recompute):
        refs.append(hop.act_in)
    if hop.grad_in is not None and hop.kind == HopKind.BWD:
        refs.append(hop.grad_in)
    return refs


def _producer(st: State, ref: ObjRef) -> Optional[Hop]:
    hop = st.hops.get(ref.key.rpartition("/")[2])
    if hop is None or hop.out_key != ref.key or hop.status != HopStatus.DONE:
        return None
    return hop


def judge_claim(st: State, hotkey: str, hop_id: str, reason: str, detail: str,
                verdicts: list[Verdict], now: float, rng: random.Random) -> str:
    """Apply a consumer's bad-input claim given the bridge's verdicts on the hop's inputs;
    returns what happened (`producer_charged`, `redone`, `consumer_charged`, `retried`)."""
    tick(st, now, rng)
    hop = check_done(st, hotkey, hop_id, now)
    m = st.miners[hotkey]
    if reason == "other":
        m.failures += 1
        retry_hop(st, hop, now, rng, f"fail:other: {detail[:100]}", penalize_holder=False,
                  status=HopStatus.FAILED, avoid=(hotkey,))
        return "retried"
    for ref, verdict, why in verdicts:
        if verdict not in ("bad", "missing"):
            continue
        producer = _producer(st, ref)
        if producer is None:
            break  # not a hop output of this round: nothing to redo, retry the consumer below
        st.unplace(hop)
        hop.status, hop.note = HopStatus.FAILED, f"input {ref.key} {verdict}: {why}"[:300]
        reject_output(st, producer, f"{verdict} output ({reason} from {hotkey}): {why}",
                      charge=verdict == "bad", now=now, rng=rng)
        return "producer_charged" if verdict == "bad" else "redone"
    if verdicts and any(v == "unchecked" for _, v, _ in verdicts):
        retry_hop(st, hop, now, rng, f"fail:{reason} (unchecked)", penalize_holder=False,
                  status=HopStatus.FAILED, avoid=(hotkey,))
        return "retried"
    m.failures += 1
    m.false_claims += 1
    penalize(st, m, now)
    log.warning("false claim: %s reported %s on hop %s; its inputs check out", hotkey, reason,
                hop_id)
    retry_hop(st, hop, now, rng, f"false claim: {reason}", penalize_holder=False,
              status=HopStatus.FAILED, avoid=(hotkey,))
    return "consumer_charged"


def reject_output(st: State, producer: Hop, why: str, charge: bool, now: float,
                  rng: random.Random) -> None:
    """A done hop's output is proven bad (charge=True) or lost: mark the hop `rejected`,
    rewind the sample to before it, and do it again on another replica (or abandon the
    sample when that hop has used its attempts)."""
    who = st.miners.get(producer.leased_to or "")
    producer.status, producer.note = HopStatus.REJECTED, why[:300]
    if who is not None and charge:
        who.failures += 1
        who.bad_outputs += 1
        penalize(st, who, now)
        log.warning("bad output: hop %s by %s: %s", producer.hop_id, who.hotkey, why)
    if who is not None and producer.kind != HopKind.FWD and producer.epoch == who.epoch \
            and producer.round == st.round and who.round_samples > 0:
        who.round_samples -= 1  # a rejected backward earns no merge weight
    sample = st.samples[producer.sample_id]
    if producer.kind.runs_forward:
        _rewind(st, sample, producer.stage)
    if producer.attempt >= st.run.max_attempts:
        rounds.finish_sample(st, sample, SampleStatus.ABANDONED,
                             f"bad output after {producer.attempt} attempts", now)
        return
    redo_hop(st, producer, now, rng, avoid=(who.hotkey,) if who is not None and charge else ())


def _rewind(st: State, sample: Sample, stage: int) -> None:
    """Forget the sample's forwards from `stage` on: they are computed again."""
    last = st.run.n_stages - 1
    for t in range(stage, sample.fwd_done_stage + 1):
        st.fwd_pending[t] += 1
        if t < last:  # the last stage's fwdbwd holds no graph
            rounds.drop_graph(st, sample, t)
        sample.fwd_by.pop(t, None)
    sample.fwd_done_stage = stage - 1

"""Round transitions: start (mint samples), sample end, close -> merge, merge-set freeze,
merged-hash votes (strict majority publishes round r+1's state; a split vote is settled when
every member voted or the vote timeout passed), late repeats, and content-addressed keys."""
from __future__ import annotations

import logging
from typing import Any, Optional

from bridge.records import Hop, Sample, StageState, State, TransitionError

__all__ = ["start_round", "mint_more", "MINT_CHUNK", "finish_sample", "drop_graph",
           "maybe_freeze", "upload_key", "report_pseudograd", "merge_set", "report_merged",
           "settle_votes", "moved_on", "published_state", "check_archived_pseudograd"]

log = logging.getLogger(__name__)

MINT_CHUNK = 512  # samples minted at a time; refilled when stage 0's pool runs low


def start_round(st: State, r: int, now: float) -> None:
    """Mint samples [r*N, (r+1)*N) with their stage-0 forwards, reset every miner's step."""
    if r >= st.run.total_rounds:
        if st.phase == "merge":
            _archive(st)
        st.phase = "done"
        st.touch("meta", None)
        st.events.append(("run_done", r))
        log.info("run %s done after %d rounds", st.run.run_id, r)
        return
    if st.phase == "merge":
        _archive(st)
    n, s = st.run.samples_per_round, st.run.n_stages
    st.round_states = [dict(vars(x)) for x in st.stage_states]
    st.phase, st.round, st.merge_started = "train", r, 0.0
    st.r_completed = st.r_abandoned = 0
    st.fwd_pending = [n] * s
    st.workers, st.pseudograds, st.frozen, st.votes, st.published = {}, {}, {}, {}, {}
    st.vote_deadline = {}
    st.flagged = []
    st.samples = {}
    st.hops = {}
    st.minted = 0
    st.reindex()
    mint_more(st)
    for m in st.miners.values():
        m.round, m.inner_step, m.quota_used, m.step_samples = r, 0, 0, 0
        m.open_graphs = m.round_steps = 0
        st.touch("miner", m.hotkey, m)
    st.touch("meta", None)
    _archive(st)
    st.events.append(("round_start", r))
    log.info("round %d started: %d samples over %d stages", r, n, s)


def mint_more(st: State) -> int:
    """Mint the round's next MINT_CHUNK samples with their stage-0 forwards (in the pool).

    Minting lazily keeps a round start (and each refill) to a short transition instead of one
    that writes every sample of the round while every request waits."""
    n, r = st.run.samples_per_round, st.round
    k = min(MINT_CHUNK, n - st.minted)
    kind = "fwdbwd" if st.run.n_stages == 1 else "fwd"
    for sid in range(r * n + st.minted, r * n + st.minted + k):
        sample = Sample(sample_id=sid, round=r)
        st.samples[sid] = sample
        st.touch("sample", sid, sample)
        hop = Hop(hop_id=st.next_hop_id(), sample_id=sid, round=r, stage=0, kind=kind)
        st.hops[hop.hop_id] = hop
        st.touch("hop", hop.hop_id, hop)
        st.place(hop)
    st.minted += k
    st.touch("meta", None)
    return k


def _archive(st: State) -> None:
    """Persist what validators need about the current round after it is gone from memory."""
    items = [dict(hotkey=h, stage=s, **st.pseudograds[s][h])
             for s in sorted(st.frozen) for h in st.frozen[s]]
    st.touch("round", st.round, {"round": st.round, "states": st.round_states,
                                 "pseudograds": items, "flagged": list(st.flagged)})


def drop_graph(st: State, sample: Sample, stage: int) -> None:
    """The forward graph held for (sample, stage) is used up or lost: release it once."""
    rec = sample.fwd_by.get(stage)
    if rec is None or rec[1] < 0:
        return
    holder = st.miners.get(rec[0])
    if holder is not None and holder.epoch == rec[1] and holder.open_graphs > 0:
        holder.open_graphs -= 1
        st.touch("miner", holder.hotkey, holder)
    rec[1] = -1
    st.touch("sample", sample.sample_id, sample)


def finish_sample(st: State, sample: Sample, status: str, reason: str, now: float) -> None:
    """End a sample (completed or abandoned with a reason); close the round when all ended."""
    if sample.status != "active":
        return
    sample.status, sample.reason = status, reason
    st.touch("sample", sample.sample_id, sample)
    st.touch("meta", None)
    if status == "completed":
        st.r_completed += 1
        st.completed_total += 1
    else:
        st.r_abandoned += 1
        st.abandoned_total += 1
        st.abandon_reasons[reason] = st.abandon_reasons.get(reason, 0) + 1
        for s in range(sample.fwd_done_stage + 1, st.run.n_stages):
            st.fwd_pending[s] -= 1
        for s in list(sample.fwd_by):
            drop_graph(st, sample, s)
        log.info("sample %d abandoned: %s", sample.sample_id, reason)
    if st.r_completed + st.r_abandoned >= st.run.samples_per_round:
        _close_round(st, now)


def _close_round(st: State, now: float) -> None:
    st.phase, st.merge_started = "merge", now
    for s in range(st.run.n_stages):
        st.workers[s] = [m.hotkey for m in st.stage_miners(s)
                         if m.round_steps > 0 or m.step_samples > 0]
    st.touch("meta", None)
    st.events.append(("round_close", st.round))
    log.info("round %d closed: %d completed, %d abandoned; merge begins", st.round,
             st.r_completed, st.r_abandoned)
    maybe_freeze(st, now)


def maybe_freeze(st: State, now: float) -> None:
    """Freeze each stage's merge set once its workers reported or the merge timeout passed."""
    timed_out = now >= st.merge_started + st.run.merge_timeout_seconds
    for s in range(st.run.n_stages):
        if st.phase != "merge":
            return  # a publish below completed the round: the next one began
        if s in st.frozen:
            if not st.published.get(s) and now >= st.vote_deadline.get(s, float("inf")):
                settle_votes(st, s, now)
            continue
        reported = st.pseudograds.get(s, {})
        if timed_out or all(h in reported for h in st.workers.get(s, [])):
            st.frozen[s] = sorted(reported)
            st.vote_deadline[s] = now + st.run.merge_timeout_seconds
            st.touch("meta", None)
            log.info("round %d stage %d merge set frozen with %d items%s", st.round, s,
                     len(st.frozen[s]), " (timeout)" if timed_out else "")
            if not st.frozen[s]:
                _publish(st, s, None, now)  # no work: the stage keeps its previous state


def upload_key(st: State, hotkey: str, round_: int, kind: str, sha256: str) -> str:
    """Content-addressed key for a pseudo-gradient (round r) or a merged state (round r+1)."""
    m = _member(st, hotkey, round_)
    base = f"runs/{st.run.run_id}"
    if kind == "pseudograd":
        return f"{base}/r{round_}/s{m.stage}/pg/{hotkey}-{sha256}"
    return f"{base}/r{round_ + 1}/s{m.stage}/state/{sha256}"


def _member(st: State, hotkey: str, round_: int) -> Any:
    m = st.miners.get(hotkey)
    if m is None:
        raise TransitionError(409, "not_registered", f"hotkey {hotkey} is not registered")
    if st.phase != "merge" or round_ != st.round:
        raise TransitionError(409, "not_merging",
                              f"round {round_} is not merging (run at round {st.round}, {st.phase})")
    return m


def report_pseudograd(st: State, hotkey: str, round_: int, key: str, sha256: str, size: int,
                      samples: int, now: float) -> None:
    """Record a replica's uploaded pseudo-gradient (same report twice is a no-op)."""
    m = _member(st, hotkey, round_)
    if key != upload_key(st, hotkey, round_, "pseudograd", sha256):
        raise TransitionError(400, "bad_key", f"key {key} is not this pseudo-gradient's key")
    have = st.pseudograds.get(m.stage, {}).get(hotkey)
    if have is not None:
        if have["sha256"] == sha256:
            return
        raise TransitionError(409, "already_reported", "a different pseudo-gradient was reported")
    if m.stage in st.frozen:
        raise TransitionError(409, "frozen", f"stage {m.stage} merge set is already frozen")
    if hotkey not in st.workers.get(m.stage, []):
        raise TransitionError(409, "no_work", f"{hotkey} did no work in round {round_}")
    st.pseudograds.setdefault(m.stage, {})[hotkey] = {
        "key": key, "sha256": sha256, "size": size, "samples": samples, "epoch": m.epoch}
    st.touch("meta", None)
    maybe_freeze(st, now)


def merge_set(st: State, round_: int, stage: int) -> list[dict[str, Any]]:
    """The frozen merge set of a stage in fixed (hotkey) order; 409 until frozen."""
    if round_ != st.round or st.phase != "merge":
        raise TransitionError(409, "not_merging", f"round {round_} is not merging")
    if not 0 <= stage < st.run.n_stages:
        raise TransitionError(404, "unknown_stage", f"stage {stage} does not exist")
    if stage not in st.frozen:
        raise TransitionError(409, "not_frozen", f"stage {stage} merge set is not frozen yet")
    return [dict(hotkey=h, **st.pseudograds[stage][h]) for h in st.frozen[stage]]


def report_merged(st: State, hotkey: str, round_: int, sha256: str, key: str, size: int,
                  now: float) -> Optional[bool]:
    """Record a merged-state hash; publish on a strict majority of the frozen set.
    Returns whether this vote agrees with the published state (None until published)."""
    m = _member(st, hotkey, round_)
    if key != upload_key(st, hotkey, round_, "state", sha256):
        raise TransitionError(400, "bad_key", f"key {key} is not this state's key")
    if m.stage not in st.frozen:
        raise TransitionError(409, "not_frozen", f"stage {m.stage} merge set is not frozen yet")
    votes = st.votes.setdefault(m.stage, {})
    votes[hotkey] = {"sha256": sha256, "key": key, "size": size}
    st.touch("meta", None)
    if st.published.get(m.stage):
        agreed = st.stage_states[m.stage].sha256
        _flag_if_disagrees(st, hotkey, sha256, agreed)
        return sha256 == agreed
    members = st.frozen[m.stage]
    tally = sum(1 for h in members if votes.get(h, {}).get("sha256") == sha256)
    if tally * 2 <= len(members):
        if all(h in votes for h in members):  # every member voted, no majority: settle now
            settle_votes(st, m.stage, now)
            return sha256 == st.stage_states[m.stage].sha256
        return None
    for h, v in votes.items():
        _flag_if_disagrees(st, h, v["sha256"], sha256)
    _publish(st, m.stage, votes[hotkey], now)  # may start the next round
    return True


def _flag_if_disagrees(st: State, hotkey: str, sha: str, agreed: Optional[str]) -> None:
    if sha != agreed and hotkey not in st.flagged:
        st.flagged.append(hotkey)
        m = st.miners[hotkey]
        m.disagreements += 1
        st.touch("miner", hotkey, m)
        log.warning("round %d: %s merged to %s, majority %s", st.round, hotkey, sha[:12],
                    (agreed or "")[:12])


def _publish(st: State, stage: int, vote: Optional[dict[str, Any]], now: float) -> None:
    if vote is not None:
        st.stage_states[stage] = StageState(round=st.round + 1, key=vote["key"],
                                            sha256=vote["sha256"], size=vote["size"])
    st.published[stage] = True
    st.touch("meta", None)
    st.events.append(("published", (st.round, stage)))
    log.info("round %d stage %d: state for round %d published (%s)", st.round, stage,
             st.round + 1, (st.stage_states[stage].sha256 or "init")[:12])
    if all(st.published.get(s) for s in range(st.run.n_stages)):
        start_round(st, st.round + 1, now)


def settle_votes(st: State, stage: int, now: float) -> None:
    """No strict majority by the vote deadline (or ever): publish the largest agreeing group's
    state, ties to the lowest sha, and flag every other voter. No votes: keep the old state."""
    members = set(st.frozen.get(stage, ()))
    votes = {h: v for h, v in st.votes.get(stage, {}).items() if h in members}
    if not votes:
        log.warning("round %d stage %d: no merged state reported by the deadline; the stage "
                    "keeps its previous state", st.round, stage)
        _publish(st, stage, None, now)
        return
    counts: dict[str, int] = {}
    for v in votes.values():
        counts[v["sha256"]] = counts.get(v["sha256"], 0) + 1
    best = min(counts, key=lambda sha: (-counts[sha], sha))
    winner = next(v for h, v in sorted(votes.items()) if v["sha256"] == best)
    log.warning("round %d stage %d: no strict majority among %d members (%s); publishing %s",
                st.round, stage, len(members),
                ", ".join(f"{k[:8]}x{n}" for k, n in sorted(counts.items())), best[:12])
    for h, v in sorted(st.votes.get(stage, {}).items()):
        _flag_if_disagrees(st, h, v["sha256"], best)
    _publish(st, stage, winner, now)


def moved_on(st: State, round_: int) -> bool:
    """True when round `round_`'s merge is over: every stage published and the run moved on."""
    return round_ < st.round or (round_ == st.round and st.phase == "done")


def published_state(st: State, hotkey: str, round_: int, sha256: str, key: str,
                    archive_next: Optional[dict[str, Any]]) -> tuple[int, StageState]:
    """(stage, state published at the end of `round_`) for a late merged report by `hotkey`;
    `archive_next` is round `round_ + 1`'s archive, needed for rounds older than the last."""
    m = st.miners.get(hotkey)
    if m is None:
        raise TransitionError(409, "not_registered", f"hotkey {hotkey} is not registered")
    if key != f"runs/{st.run.run_id}/r{round_ + 1}/s{m.stage}/state/{sha256}":
        raise TransitionError(400, "bad_key", f"key {key} is not this state's key")
    if round_ == st.round and st.phase == "done":
        return m.stage, st.stage_states[m.stage]
    if round_ == st.round - 1:
        return m.stage, StageState(**st.round_states[m.stage])
    states = (archive_next or {}).get("states", [])
    if m.stage >= len(states):
        raise TransitionError(409, "stale_round", f"round {round_} is too old to report on")
    return m.stage, StageState(**states[m.stage])


def check_archived_pseudograd(archive: Optional[dict[str, Any]], hotkey: str, round_: int,
                              key: str, sha256: str, size: int, samples: int) -> None:
    """Accept a late repeat of a pseudo-gradient report that is in the round's frozen merge
    set exactly as reported; anything else is refused (409 not_merging)."""
    for item in (archive or {}).get("pseudograds", []):
        if item["hotkey"] == hotkey and item["key"] == key:
            if (item["sha256"], item["size"], item["samples"]) == (sha256, size, samples):
                return
            raise TransitionError(409, "already_reported",
                                  "a different pseudo-gradient was reported for this round")
    raise TransitionError(409, "not_merging", f"round {round_} is over and its merge set does "
                          f"not hold this pseudo-gradient from {hotkey}")

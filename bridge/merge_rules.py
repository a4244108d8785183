"""Who may take part in the merging round and under which object keys (pure, read-only): the
rules every merge transition checks first (bridge.rounds, bridge.votes, bridge.shard_round,
bridge.shard_checks all build on this module and nothing here imports them).

Keys: a replica PUTs to its own staging key (`.../upload/{hotkey}/...`, protocol.keys); when it
reports, the bridge copies the object to a final key nobody holds a grant for, so what was
reported is what every reader gets (write-once)."""
from __future__ import annotations

import hashlib
from typing import Optional

from bridge.records import Miner, State, TransitionError
from protocol.keys import PseudogradKey, StateKey
from protocol.lifecycle import Phase
from protocol.sync_api import checkpoint_due

__all__ = ["member", "merge_upload_key", "final_key", "check_upload_key", "check_report", "sharded", "need_sharded",
           "checkpoint_round", "need_checkpoint_vote", "pieces_sha"]


def _merge_key(st: State, stage: int, hotkey: str, round_: int, kind: str,
               sha256: str) -> PseudogradKey | StateKey:
    """The typed key of a replica's merge upload: its pseudo-gradient of `round_`, or the state it
    merged for round `round_ + 1`."""
    if kind == "pseudograd":
        return PseudogradKey(st.run.run_id, round_, stage, hotkey, sha256)
    return StateKey(st.run.run_id, round_ + 1, stage, hotkey, sha256)


def merge_upload_key(st: State, hotkey: str, round_: int, kind: str, sha256: str) -> str:
    """The staging key a replica may PUT its pseudo-gradient or merged state to (its own). In a
    sharded run only a checkpoint's state goes this way (the pieces have their own routes)."""
    m = member(st, hotkey, round_)
    if st.run.sharded:
        if kind == "pseudograd":
            raise TransitionError("sharded_run", "this run syncs shard by shard (sync_mode: sharded): "
                                  "upload and report the pseudo-gradient's pieces through the sync routes")
        need_checkpoint_vote(st, m.stage, round_)
    return _merge_key(st, m.stage, hotkey, round_, kind, sha256).staging


def final_key(st: State, hotkey: str, round_: int, kind: str, sha256: str) -> str:
    """Where the bridge copies a reported upload: no miner ever holds a PUT grant for it."""
    return _merge_key(st, member(st, hotkey, round_).stage, hotkey, round_, kind, sha256).final


def check_upload_key(st: State, hotkey: str, round_: int, kind: str, key: str,
                     sha256: str) -> str:
    """The final key for a report naming staging `key`; 400 bad_key for any other key, before
    anything looks at the store (the answer never depends on which objects exist)."""
    if key != merge_upload_key(st, hotkey, round_, kind, sha256):
        raise TransitionError("bad_key", f"key {key[:200]!r} is not your {kind} upload key "
                              f"for this sha256 (ask POST /v1/rounds/upload for it)")
    return final_key(st, hotkey, round_, kind, sha256)


def member(st: State, hotkey: str, round_: int) -> Miner:
    """The registered miner `hotkey`, when round `round_` is the one merging (409 otherwise)."""
    m = st.miners.get(hotkey)
    if m is None:
        raise TransitionError("not_registered", f"hotkey {hotkey} is not registered")
    if st.phase != Phase.MERGE or round_ != st.round:
        raise TransitionError("not_merging",
                              f"round {round_} is not merging (run at round {st.round}, {st.phase})")
    return m


def check_report(st: State, hotkey: str, round_: int, sha256: str, now: Optional[float] = None) -> bool:
    """Whether `hotkey` may enter a pseudo-gradient of `sha256` in the merge set now (True: it
    is a repeat of the recorded one); refuses before anything is copied. A replica counts only
    the backwards verified since its last registration: with none (it registered again after its
    work, or every one was rejected) it has no verified work to merge and earns no credit.
    `now` None (a check before any store access): quarantine judged by registration, not liveness."""
    m = member(st, hotkey, round_)
    have = st.pseudograds.get(m.stage, {}).get(hotkey)
    if have is not None:
        if have["sha256"] == sha256:
            return True
        raise TransitionError("already_reported", "a different pseudo-gradient was reported")
    if st.quarantined(m, now):
        raise TransitionError("quarantined", f"{hotkey} failed an audit and sits out merges "
                              f"until round {m.quarantined_until}")
    if hotkey not in st.workers.get(m.stage, []):
        raise TransitionError("no_work", f"{hotkey} did no work in round {round_}")
    if m.round_samples <= 0:
        raise TransitionError("no_work", f"{hotkey} has no verified backward in round {round_} since "
                              f"its last registration (epoch {m.epoch}): nothing of it can be merged")
    if m.stage in st.frozen:
        raise TransitionError("frozen", f"stage {m.stage} merge set is already frozen")
    return False


def sharded(st: State) -> bool:
    """Whether the run syncs replicas with the sharded sync."""
    return st.run.sharded


def need_sharded(st: State) -> None:
    """409 unless the run uses the sharded sync."""
    if not sharded(st):
        raise TransitionError("not_sharded", "this run's sync_mode is 'state': report through the pseudograd route")


def need_checkpoint_vote(st: State, stage: int, round_: int) -> None:
    """409 unless a whole-state vote is due: a checkpoint round whose shards are all decided."""
    if not checkpoint_round(st, round_):
        raise TransitionError("not_checkpoint", f"round {round_} ends with no checkpoint (checkpoint_every="
                              f"{st.run.checkpoint_every}): its update is voted shard by shard")
    if str(round_) not in st.sync.get("updates", {}).get(str(stage), {}):
        raise TransitionError("not_decided", f"stage {stage}'s shards of round {round_} are not all "
                              "decided yet: vote the checkpoint once they are")


def checkpoint_round(st: State, round_: int) -> bool:
    """Whether round `round_` ends with a full checkpoint (every K-th, and the last)."""
    return checkpoint_due(round_, st.run.checkpoint_every, st.run.total_rounds)


def pieces_sha(shas: list[str]) -> str:
    """The merge-set sha256 of a sharded pseudo-gradient: sha256 of its shard sha256s, one a line."""
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()

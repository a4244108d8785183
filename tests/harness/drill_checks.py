"""What every integrity drill must show, whichever sync path it ran on: the run finished with no
sample lost, nothing the honest replicas voted was overruled, no honest miner failed or went
unpaid, each cheater earned nothing and was failed (unless it cannot be told from an honest or
crashed replica), the model trained, and its loss stayed within noise of the honest twin."""
from __future__ import annotations

from tests.harness.subnet import Outcome

__all__ = ["SHARDED", "DRILL_ROUNDS", "MERGE_PAIRS", "LOSS_TOLERANCE", "PAID_ANYWAY", "check_loss", "UNPAID_UNFAILED", "check_drill", "check_honest_updates"]

# The sharded sync (issue 13) as the drills run it.
SHARDED = (("sync_mode", "sharded"), ("sync_shards", 4), ("sync_codec", "int4"), ("sync_merged_codec", "int8"),
           ("sync_block", 64), ("sync_mergers", 3), ("checkpoint_every", 2))
# The whole-state drills' rounds, and their cheaters paired one per stage (tests/test_integrity_drills.py
# at R = 2, tests/test_integrity_drills_r3.py at R = 3: two files so two test workers share them).
DRILL_ROUNDS = 4
MERGE_PAIRS = (("liar", "flip"), ("huge", "nan"), ("overwrite", "lazy"))
# At this size (4 rounds, 8.33 -> ~7.7 nats) the honest runs' seed-to-seed spread was 0.6% (R = 2)
# and 2.0% (R = 3), and the drills' gaps to their honest twin -3.2% .. +3.3% (scripts/
# bench_integrity.py, docs/BENCHMARKS.md). A subnet that stopped training stays at its initial
# loss, 8% above its twin, and one turned around (the attack this guards against) higher still.
# The bound applies to the rounds no cheater merged in (check_loss): on a loaded box the validator's
# verdicts come later, and until then a flipped pseudo-gradient at R = 2 cancels the honest one.
LOSS_TOLERANCE = 0.05
# `overwrite` tries to change what it reported after the fact; everything anyone reads is its
# honest work, so there is nothing to punish and it is paid like an honest miner.
PAID_ANYWAY = {"overwrite"}
# `withhold` cannot be told from a replica that crashed before its report: it is not failed, it
# just earns no credit (work that never reached the merge set did not train the model).
UNPAID_UNFAILED = {"withhold"}


def check_drill(out: Outcome, base: Outcome | None, rounds: int) -> None:
    """Assert what every drill must show (`base`: the honest twin whose loss it is held to)."""
    honest = {out.names[n] for n in out.honest()}
    assert sorted(out.stage_of[n] for n in out.cheaters()) == list(range(len(out.cheaters()))), \
        "one cheater per stage"
    assert out.metrics.phase == "done" and out.metrics.abandoned_total == 0
    assert all(s.published_round == rounds for s in out.metrics.stages), "a stage stalled"
    for log in out.hoplogs:  # every published state is the one the honest replicas voted for
        assert not honest & set(log.flagged), f"round {log.round}: honest voters flagged {log.flagged}"
    assert not [v for v in out.verdicts if v[1] in out.honest() and not v[2]], "an honest miner failed"
    assert all(out.weights[n] > 0 for n in out.honest()), out.weights
    for n in out.cheaters():
        if out.kinds[n] in PAID_ANYWAY:
            continue
        assert out.weights[n] == 0.0, f"{n} earned {out.weights[n]}"
        assert out.kinds[n] in UNPAID_UNFAILED or any(v[1] == n and not v[2] for v in out.verdicts), \
            f"{n} was never failed"
    assert out.val_loss < out.init_loss, "the model did not train"
    if base is not None:
        check_loss(out, base, rounds)
    if out.views:  # the sharded sync: shard by shard too
        check_honest_updates(out)


def check_loss(out: Outcome, base: Outcome, rounds: int) -> None:
    """The model trains as well as its honest twin did in the rounds no cheater took part in.

    Until a validator's verdict quarantines it, a cheater's pseudo-gradient is in its stage's merge
    set (a flipped one at R = 2 cancels the honest one; nothing at R = 2 can tell which is honest), so
    those rounds may teach nothing; how many there are is how far the validator's replays lag, which
    a loaded box stretches. So the drill's final held-out loss (the validator's, of the published
    model) is held to the twin's after as many rounds as were free of cheaters."""
    free = rounds - len(out.cheated_rounds())
    got = out.round_losses.get(rounds - 1)
    assert got is not None, f"the validator reported no held-out loss for round {rounds - 1}: {out.round_losses}"
    if free == rounds:
        want = base.val_loss * (1 + LOSS_TOLERANCE)
        assert out.val_loss <= want, (f"published model loss {out.val_loss:.4f} vs the honest twin's "
                                      f"{base.val_loss:.4f} (an honest replica's own weights {out.miner_loss})")
    elif free >= 1:
        ref = base.round_losses.get(free - 1)
        assert ref is not None, f"the twin has no held-out loss for round {free - 1}: {base.round_losses}"
        assert got <= ref * (1 + LOSS_TOLERANCE), (
            f"held-out loss {got:.4f} after {rounds} rounds, {rounds - free} with a cheater in a merge set "
            f"({out.cheated_rounds()}); the honest twin had {ref:.4f} after {free}")


def check_honest_updates(out: Outcome) -> None:
    """Sharded runs: in every round whose ballot the bridge still keeps, every shard's decided
    update is the one its honest mergers voted (a shard with no honest vote is not judged), and
    every such round was decided."""
    honest = {out.names[n] for n in out.honest()}
    kept = {k: v for k, v in out.views.items() if v.mergers}  # older ballots are pruned
    assert kept, "no round's ballot was kept"
    for (r, stage), v in sorted(kept.items()):
        assert v.complete, f"round {r} stage {stage} was never decided"
        for s, cast in enumerate(v.votes):
            mine = {sha for hk, sha in cast.items() if hk in honest}
            assert len(mine) <= 1, f"round {r} stage {stage} shard {s}: honest mergers disagree {cast}"
            if mine:
                got = v.decided[s].sha256 if v.decided[s] is not None else None
                want = mine.pop()
                assert got == want or (got is None and want == _KEEP), \
                    f"round {r} stage {stage} shard {s}: decided {got}, the honest mergers voted {want}"


_KEEP = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of b"": keep

"""Dangerous or wrong behaviours an operator met, each pinned: device choice, a second process on
one hotkey, leaving, metagraph refresh off the event loop, a bounded database (SQLite and
PostgreSQL), settings precedence."""
from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path

import pytest

from bridge import state
from bridge.auth import Registry
from bridge.db import open_database
from bridge.records import Hop, Tunables
from neurons.cli import resolve_device
from protocol.chain.base import MetagraphView, NeuronInfo
from protocol.exits import Exit, Misconfigured, backoff_delays
from protocol.messages import RunConfig
from tests.harness.bridge_state import lease, make


# -- device -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cuda, mps, want", [(1, False, "cuda"), (2, True, "cuda"), (0, True, "mps"),
                                             (0, False, "cpu")])
def test_device_auto_prefers_cuda_then_mps_then_cpu(cuda, mps, want):
    assert resolve_device("auto", cuda_count=lambda: cuda, mps_available=lambda: mps) == want


def test_a_named_device_must_exist():
    no_gpu = dict(cuda_count=lambda: 0, mps_available=lambda: False)
    with pytest.raises(Misconfigured) as e:
        resolve_device("cuda", **no_gpu)
    assert e.value.code == Exit.DEVICE and "no CUDA device" in e.value.message
    with pytest.raises(Misconfigured) as e:
        resolve_device("cuda:2", cuda_count=lambda: 2, mps_available=lambda: False)
    assert e.value.code == Exit.DEVICE and "2 CUDA device(s)" in e.value.message
    assert resolve_device("cuda:1", cuda_count=lambda: 2, mps_available=lambda: False) == "cuda:1"
    assert resolve_device("cpu", **no_gpu) == "cpu"
    with pytest.raises(Misconfigured) as e:
        resolve_device("mps", **no_gpu)
    assert e.value.code == Exit.DEVICE
    with pytest.raises(Misconfigured) as e:
        resolve_device("tpu", **no_gpu)
    assert e.value.code == Exit.USAGE


def test_validator_auto_device_is_resolved_not_forced_to_cpu(monkeypatch):
    """The validator passes the resolved device on; with CUDA present, that is cuda."""
    import neurons.cli as cli
    monkeypatch.setattr(cli, "_cuda_count", lambda: 1)
    assert cli.resolve_device("auto") == "cuda"


# -- one hotkey, two processes; leaving -------------------------------------------------------------

def test_bridge_warns_when_a_live_hotkey_registers_again(caplog):
    st, rng = make(), random.Random(0)
    state.register(st, "a", 0.0, rng)
    with caplog.at_level(logging.WARNING, logger="bridge.state"):
        state.register(st, "a", 200.0, rng)  # long silent: a restart, no warning
        assert not caplog.records
        lease(st, "a", 201.0, rng)
        state.register(st, "a", 202.0, rng)  # heard from 1 s ago: a second live process
    assert len(caplog.records) == 1 and "two live processes" in caplog.records[0].getMessage()


def test_leave_moves_the_miners_leases_at_once_without_penalty():
    st, rng = make(), random.Random(1)
    for hk in ("a0", "b0", "a1"):
        state.register(st, hk, 0.0, rng)
    assert st.miners["a0"].stage == st.miners["a1"].stage == 0
    _, hops, _ = lease(st, "a0", 1.0, rng, 2)
    assert hops and all(h.leased_to == "a0" for h in hops)
    health = st.miners["a0"].health
    moved = state.leave(st, "a0", 2.0, rng)
    assert moved == len(hops)
    assert all(st.hops[h.hop_id].status != "leased" for h in hops)
    assert not st.miners["a0"].active and st.miners["a0"].health == health
    assert [m.hotkey for m in st.stage_miners(0)] == ["a1"]
    ids = {h.sample_id for h in hops}
    retried = [h for h in st.hops.values() if h.sample_id in ids and h.attempt == 2]
    assert len(retried) == len(hops)  # the work is out again at once, not after a lease timeout
    assert all(h.status in ("pool", "assigned") and "a0" not in (h.assigned_to, h.leased_to)
               for h in retried)
    state.register(st, "a0", 4.0, rng)  # coming back rejoins the same stage
    assert st.miners["a0"].active and st.miners["a0"].stage == 0


# -- metagraph refresh off the event loop -----------------------------------------------------------

class SlowChain:
    """A chain whose metagraph fetch blocks until released (a stalled RPC)."""

    def __init__(self) -> None:
        self.release, self.calls = threading.Event(), 0
        self.stalls_ended = 0  # stalled fetches that returned (released, or given up after 10 s)
        self.hotkeys = ["m0"]

    def metagraph(self) -> MetagraphView:
        self.calls += 1
        if self.calls > 1:
            self.release.wait(10)
            self.stalls_ended += 1
        neurons = tuple(NeuronInfo(uid=i, hotkey=h, coldkey=h, stake=0.0, validator_permit=False,
                                   last_update=0, axon_ip=None, axon_port=None)
                        for i, h in enumerate(self.hotkeys))
        return MetagraphView(netuid=1, block=1, tempo=10, owner_hotkey="m0", neurons=neurons)


def test_registry_never_blocks_a_request_on_a_slow_chain():
    chain = SlowChain()
    reg = Registry(chain, ttl=0.05)
    try:
        deadline = time.monotonic() + 10
        while chain.calls < 2 and time.monotonic() < deadline:  # the background refresh gets stuck
            time.sleep(0.02)
        assert chain.calls >= 2
        for _ in range(100):
            assert reg.is_allowed("m0", "miner")
            assert not reg.is_allowed("m1", "miner")
        # every answer came from the snapshot while the fetch was still stuck: none waited for it
        assert chain.stalls_ended == 0 and not chain.release.is_set()
        chain.hotkeys.append("m1")
        chain.release.set()
        deadline = time.monotonic() + 5
        while not reg.is_allowed("m1", "miner") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reg.is_allowed("m1", "miner")  # a newly registered hotkey is seen soon after
    finally:
        chain.release.set()
        reg.close()


# -- a bounded database (each backend) -------------------------------------------------------------

def test_the_database_keeps_only_the_last_rounds_of_hops(db_url):
    db = open_database(db_url, keep_rounds=3)
    st = db.load(RunConfig(run_id="t", model={}, n_stages=1, batch_size=1, micro_batches_per_step=1,
                           inner_steps_per_round=1, samples_per_round=1, muon_lr=0.02,
                           adamw_lr=0.003, total_rounds=100, data_seed=1, init_seed=2), Tunables())
    for rnd in range(30):
        st.round = rnd
        dirty = {}
        for i in range(50):
            h = Hop(hop_id=f"r{rnd}x{i}", sample_id=i, round=rnd, stage=0, kind="fwd", status="done",
                    note="x" * 200)
            dirty[("hop", h.hop_id)] = h
        tx = db.begin()
        st = tx.fold(st)
        tx.commit(st, dirty)
    rounds_left = [r for r in range(30) if db.done_hops(r, None)]
    assert rounds_left == list(range(26, 30)), rounds_left  # the current round and the 3 before
    if not db.shared:
        wal = Path(db_url + "-wal")
        assert not wal.exists() or wal.stat().st_size < 1 << 20
    db.close()
    with pytest.raises(ValueError):
        open_database(db_url, keep_rounds=0)


# -- retries ---------------------------------------------------------------------------------------

def test_backoff_doubles_up_to_its_cap_within_the_budget():
    assert backoff_delays(1.0, 4.0, 20.0) == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert sum(backoff_delays(1.0, 30.0, 600.0)) <= 600.0
    assert backoff_delays(1.0, 30.0, 0.5) == []


# -- localnet working folder ----------------------------------------------------------------------

def test_localnet_never_wipes_a_folder_it_did_not_make(tmp_path):
    from scripts.localnet_workdir import MARKER, prepare_workdir
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "precious.py").write_text("keep me")
    for target in (checkout, checkout / "precious.py"):
        with pytest.raises(Misconfigured) as e:
            prepare_workdir(target)
        assert e.value.code == Exit.USAGE
    assert (checkout / "precious.py").read_text() == "keep me"
    fresh = prepare_workdir(tmp_path / "new" / "out")  # created, marked
    (fresh / "logs").mkdir()
    (fresh / "report.json").write_text("{}")
    again = prepare_workdir(fresh)  # ours: emptied and reused
    assert again == fresh and sorted(p.name for p in again.iterdir()) == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_workdir(empty) == empty and (empty / MARKER).is_file()


def test_localnet_refuses_the_current_folder_in_one_line(tmp_path, monkeypatch, capsys):
    """`--workdir .` in a checkout: one error line and exit 2, nothing deleted."""
    from scripts import localnet
    (tmp_path / "setup.py").write_text("# a checkout")
    monkeypatch.chdir(tmp_path)
    assert localnet.main(["--workdir", ".", "--rounds", "1"]) == Exit.USAGE
    assert (tmp_path / "setup.py").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --workdir") and "did not create" in err[0]


# -- audits that find objects gone ------------------------------------------------------------------

def test_an_incomplete_audit_says_why_objects_are_gone():
    from neurons.audit_hints import explain_incomplete
    behind = explain_incomplete("GET failed with HTTP 404", audited_round=3, newest_round=9, window=4)
    assert "left the audit window" in behind and "6 rounds behind" in behind and "keeps 4 rounds" in behind
    inside = explain_incomplete("GET failed with HTTP 404", audited_round=8, newest_round=9, window=4)
    assert "inside the 4-round audit window" in inside
    assert explain_incomplete("budget of 120s spent", 3, 9, 4) == "budget of 120s spent"

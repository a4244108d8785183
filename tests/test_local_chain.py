"""LocalChain specifics: shared state across processes, permits, incentives, the clock, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bittensor.sp_core import Keypair

from protocol.chain import ChainFailure, LocalChain

ROOT = Path(__file__).resolve().parents[1]
OWNER = Keypair.create_from_uri("//Alice")
KEYS = [Keypair.create_from_uri(f"//Key{i}") for i in range(6)]
FROZEN = 1e9  # seconds per block: the wall clock never moves a block during a test


def _chain(tmp_path: Path, **kw) -> LocalChain:
    chain = LocalChain(tmp_path / "chain.db", 1, seconds_per_block=FROZEN)
    chain.create_subnet(OWNER, **kw)
    return chain


def _cli(db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protocol.chain.local_cli", "--db", str(db),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_two_processes_share_one_chain(tmp_path):
    chain = _chain(tmp_path, weights_rate_limit=5)
    db = tmp_path / "chain.db"
    out = _cli(db, "register", "//Bob", "//Charlie")
    assert out.returncode == 0, out.stderr
    bob = Keypair.create_from_uri("//Bob").ss58_address
    assert chain.uid_of(bob) == 1  # this process sees the other's registration
    assert _cli(db, "stake", "//Bob", "7.5").returncode == 0
    chain.advance_blocks(42)
    chain.set_weights(Keypair.create_from_uri("//Bob"), [2], [1.0])
    shown = _cli(db, "show")
    assert shown.returncode == 0, shown.stderr
    mg = json.loads(shown.stdout)
    assert mg["block"] == 42
    by_uid = {n["uid"]: n for n in mg["neurons"]}
    assert by_uid[1]["stake"] == 7.5 and by_uid[1]["validator_permit"] is True
    assert by_uid[2]["incentive"] == 1.0 and by_uid[1]["last_update"] == 42


def test_permits_go_to_top_k_by_stake(tmp_path):
    chain = _chain(tmp_path, max_validators=2)
    for k in KEYS[:4]:
        chain.register(k)
    for k, amount in zip(KEYS[:4], [5.0, 50.0, 20.0, 1.0]):
        chain.add_stake(k.ss58_address, amount)
    permitted = {n.hotkey for n in chain.metagraph().validators}
    assert permitted == {KEYS[1].ss58_address, KEYS[2].ss58_address}
    chain.add_stake(KEYS[3].ss58_address, 100.0)
    permitted = {n.hotkey for n in chain.metagraph().validators}
    assert permitted == {KEYS[3].ss58_address, KEYS[1].ss58_address}


def test_incentives_are_stake_weighted_average_of_validator_weights(tmp_path):
    chain = _chain(tmp_path, max_validators=2)
    v1, v2, m1, m2, m3 = (chain.register(k) for k in KEYS[:5])
    chain.add_stake(KEYS[0].ss58_address, 30.0)
    chain.add_stake(KEYS[1].ss58_address, 10.0)
    assert all(v == 0.0 for v in chain.incentives().values())
    assert chain.set_weights(KEYS[0], [m1, m2], [1.0, 1.0]).ok
    assert chain.set_weights(KEYS[1], [m2, m3], [1.0, 3.0]).ok
    inc = chain.incentives()
    assert inc[m1] == pytest.approx(0.75 * 0.5)
    assert inc[m2] == pytest.approx(0.75 * 0.5 + 0.25 * 0.25)
    assert inc[m3] == pytest.approx(0.25 * 0.75)
    assert sum(inc.values()) == pytest.approx(1.0) and inc[v1] == 0.0 and inc[v2] == 0.0


def test_max_weight_limit_clips_and_bad_weights_rejected(tmp_path):
    chain = _chain(tmp_path, max_weight_limit=0.5)
    v, a, b, c = (chain.register(k) for k in KEYS[:4])
    chain.add_stake(KEYS[0].ss58_address, 1.0)
    assert chain.set_weights(KEYS[0], [a], [-1.0]).status == "error"
    assert chain.set_weights(KEYS[0], [99], [1.0]).message.startswith("unknown uids")
    assert chain.set_weights(KEYS[0], [a, b, c], [8.0, 1.0, 1.0]).ok
    w = chain.weights_of(KEYS[0].ss58_address)
    assert max(w.values()) <= 0.5 + 1e-6 and sum(w.values()) == pytest.approx(1.0)


def test_advance_blocks_and_wall_clock(tmp_path):
    chain = LocalChain(tmp_path / "c.db", 1, seconds_per_block=0.05)
    start = chain.current_block()
    assert chain.advance_blocks(100) >= start + 100
    with pytest.raises(ValueError):
        chain.advance_blocks(-1)
    import time
    before = chain.current_block()
    time.sleep(0.12)
    assert chain.current_block() >= before + 2  # wall time moves the clock too


def test_missing_subnet_and_duplicate_create_are_clear_errors(tmp_path):
    chain = LocalChain(tmp_path / "c.db", 3, seconds_per_block=FROZEN)
    with pytest.raises(ChainFailure, match="subnet 3 does not exist"):
        chain.metagraph()
    chain.create_subnet(OWNER)
    with pytest.raises(ChainFailure, match="already exists"):
        chain.create_subnet(OWNER)
    with pytest.raises(ChainFailure, match="not registered"):
        chain.add_stake(KEYS[0].ss58_address, 1.0)


def test_open_chain_names_the_same_backends_for_every_process(tmp_path):
    """Bridge, miner and validator share one spelling: localchain:PATH (local:PATH too) or a network."""
    from protocol.chain import BittensorChain, LocalChain, open_chain
    from protocol.exits import Exit, Misconfigured
    path = tmp_path / "chain.sqlite"
    with pytest.raises(Misconfigured) as missing:  # a typo must not create an empty chain
        open_chain(f"localchain:{path}", netuid=3)
    assert missing.value.code == Exit.LOCALCHAIN_MISSING and not path.exists()
    LocalChain(path, netuid=3).close()
    for spec in (f"localchain:{path}", f"local:{path}"):
        chain = open_chain(spec, netuid=3)
        assert isinstance(chain, LocalChain)
    assert isinstance(open_chain("finney", netuid=3), BittensorChain)  # lazy: no connection yet
    with pytest.raises(Misconfigured) as unknown:
        open_chain("fney", netuid=3)
    assert unknown.value.code == Exit.NETWORK_NAME

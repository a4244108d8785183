"""One contract suite for every `Chain` backend: LocalChain (SQLite) and BittensorChain running
the real bittensor 11 SDK over tests/fake_substrate.py."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bittensor.sp_core import Keypair

from protocol.chain import BittensorChain, Chain, ChainFailure, LocalChain
from tests.fake_substrate import FakeSubstrate

OWNER = Keypair.create_from_uri("//Alice")
VALI = Keypair.create_from_uri("//Bob")
MINER1 = Keypair.create_from_uri("//Charlie")
MINER2 = Keypair.create_from_uri("//Dave")
STRANGER = Keypair.create_from_uri("//Eve")
COLD = Keypair.create_from_uri("//Ferdie")  # pays for every registration below
NETUID = 7


@dataclass(frozen=True)
class DevWallet:
    """Wallet-shaped dev keys: registration is signed and paid by the coldkey."""
    coldkey: Keypair
    coldkeypub: Keypair
    hotkey: Keypair


def w(hotkey: Keypair) -> DevWallet:
    """The wallet of `hotkey` under the shared test coldkey."""
    return DevWallet(COLD, COLD, hotkey)
RATE_LIMIT = 10
HOME_CACHE = Path.home() / ".bittensor" / "btcli_token_symbols.json"


@dataclass
class Backend:
    chain: Chain
    advance: Callable[[int], object]
    stake: Callable[[str, float], object]


@pytest.fixture(params=["local", "bittensor"])
def backend(request, tmp_path, monkeypatch) -> Iterator[Backend]:
    cache = tmp_path / "token_symbols.json"
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(cache))
    home_before = HOME_CACHE.stat().st_mtime_ns if HOME_CACHE.exists() else None
    if request.param == "local":
        chain = LocalChain(tmp_path / "chain.db", NETUID, seconds_per_block=1e9)
        chain.create_subnet(OWNER, weights_rate_limit=RATE_LIMIT)
        yield Backend(chain, chain.advance_blocks, chain.add_stake)
    else:
        fake = FakeSubstrate()
        fake.create_subnet(NETUID, OWNER.ss58_address, OWNER.ss58_address, rate_limit=RATE_LIMIT)
        chain = BittensorChain("local", NETUID, substrate=fake)
        yield Backend(chain, fake.advance_blocks, lambda hk, t: fake.add_stake(NETUID, hk, t))
        assert cache.exists(), "SDK should cache token symbols where the test pointed it"
    chain.close()
    home_after = HOME_CACHE.stat().st_mtime_ns if HOME_CACHE.exists() else None
    assert home_after == home_before, "the SDK wrote into the home directory"


def test_register_shows_in_metagraph(backend):
    chain = backend.chain
    assert chain.owner_hotkey() == OWNER.ss58_address
    uid = chain.register(w(MINER1))
    assert uid == 1 and chain.register(w(MINER1)) == 1  # idempotent
    assert chain.register(w(MINER2)) == 2
    mg = chain.metagraph()
    assert mg.netuid == NETUID and mg.block == chain.current_block()
    assert [n.hotkey for n in mg.neurons] == [OWNER.ss58_address, MINER1.ss58_address,
                                             MINER2.ss58_address]
    assert mg.by_hotkey(MINER1.ss58_address).coldkey == COLD.ss58_address  # the coldkey paid
    assert mg.uid_of(MINER2.ss58_address) == 2 and chain.uid_of(MINER2.ss58_address) == 2
    assert mg.owner_hotkey == OWNER.ss58_address


def test_register_refuses_a_bare_keypair_on_a_real_chain():
    fake = FakeSubstrate()
    fake.create_subnet(NETUID, OWNER.ss58_address, OWNER.ss58_address)
    chain = BittensorChain("local", NETUID, substrate=fake)
    try:
        with pytest.raises(ChainFailure, match="needs a wallet"):
            chain.register(MINER1)  # a hotkey alone would pay the burn itself
        assert chain.uid_of(MINER1.ss58_address) is None
    finally:
        chain.close()


def test_set_weights_reads_back_normalised(backend):
    chain = backend.chain
    vali = chain.register(w(VALI))
    m1, m2 = chain.register(w(MINER1)), chain.register(w(MINER2))
    backend.stake(VALI.ss58_address, 100.0)
    assert chain.metagraph().neurons[vali].validator_permit
    res = chain.set_weights(VALI, [m1, m2], [1.0, 3.0], version_key=0)
    assert res.status == "ok", res.message
    got = chain.weights_of(VALI.ss58_address)
    assert set(got) == {m1, m2}
    assert got[m1] == pytest.approx(0.25, abs=1e-4) and got[m2] == pytest.approx(0.75, abs=1e-4)
    assert chain.blocks_since_last_update(VALI.ss58_address) == 0
    assert chain.weights_of(MINER1.ss58_address) == {}


def test_rate_limit_then_allowed_after_waiting(backend):
    chain = backend.chain
    chain.register(w(VALI))
    m1 = chain.register(w(MINER1))
    backend.stake(VALI.ss58_address, 50.0)
    assert chain.weights_rate_limit() == RATE_LIMIT
    assert chain.set_weights(VALI, [m1], [1.0]).ok
    again = chain.set_weights(VALI, [m1], [1.0])
    assert again.status == "rate_limited" and again.blocks_left == RATE_LIMIT
    assert "rate limit" in again.message
    backend.advance(RATE_LIMIT - 3)
    assert chain.set_weights(VALI, [m1], [1.0]).blocks_left == 3
    backend.advance(3)
    assert chain.set_weights(VALI, [m1], [1.0]).ok


def test_weights_without_permit_rejected(backend):
    chain = backend.chain
    chain.register(w(MINER1))
    m2 = chain.register(w(MINER2))
    res = chain.set_weights(MINER1, [m2], [1.0])
    assert res.status == "error" and "permit" in res.message


def test_serve_publishes_axon(backend):
    chain = backend.chain
    uid = chain.register(w(MINER1))
    chain.serve(MINER1, "10.1.2.3", 8091)
    n = chain.metagraph().neurons[uid]
    assert (n.axon_ip, n.axon_port) == ("10.1.2.3", 8091)
    assert chain.metagraph().neurons[0].axon_ip is None


def test_unknown_hotkey(backend):
    chain = backend.chain
    chain.register(w(MINER1))
    hk = STRANGER.ss58_address
    assert chain.uid_of(hk) is None and chain.metagraph().by_hotkey(hk) is None
    assert chain.blocks_since_last_update(hk) is None and chain.weights_of(hk) == {}
    res = chain.set_weights(STRANGER, [1], [1.0])
    assert res.status == "not_registered" and hk in res.message
    with pytest.raises(ChainFailure):
        chain.serve(STRANGER, "10.0.0.1", 9000)


def test_bittensor_chain_is_lazy_and_checks_network():
    fake = FakeSubstrate()
    chain = BittensorChain("test", 1, substrate=fake)
    assert fake.calls == [] and chain._client is None  # nothing built or connected yet
    with pytest.raises(ValueError, match="network must be one of"):
        BittensorChain("mainnet", 1)

"""An in-memory stand-in for the bittensor 11 SDK's `Substrate` (the seam `Client(substrate=)`
exposes), modelling just the storage, runtime API and extrinsics that `BittensorChain` drives:
burned registration (through the MEV-shield path the SDK insists on), serve_axon,
set_mechanism_weights, and the reads behind metagraph / uid / rate limit / weights.

Everything above this object (SyncClient, reads, Metagraph decoding, intents with their
preflight, weight conforming and u16 quantisation, the executor and its shield follow-up)
is the real SDK code. Block hashes ignore history: every read sees the head state.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from bittensor.balance import Balance
from bittensor.result import ChainError, ExtrinsicResult

__all__ = ["FakeSubstrate"]

RAO_PER_TAO = 10**9
U16_MAX = 65535


@dataclass
class _Neuron:
    hotkey: str
    coldkey: str
    registered_at: int
    stake_rao: int = 0
    last_update: int = 0
    axon: dict | None = None


@dataclass
class _Subnet:
    owner_hotkey: str
    owner_coldkey: str
    tempo: int
    rate_limit: int
    max_weights_limit: int
    max_validators: int
    registered_at: int
    burn_rao: int = 10**9
    neurons: list[_Neuron] = field(default_factory=list)
    weights: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Composed:
    module: str
    function: str
    params: dict
    data: bytes


def _ml_kem_768_public_key(seed: int) -> bytes:
    """A well-formed ML-KEM-768 encapsulation key (12-bit coefficients < q, plus rho)."""
    rng = random.Random(seed)
    out = bytearray()
    for _ in range(384):
        a, b = rng.randrange(3329), rng.randrange(3329)
        out += bytes([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4])
    return bytes(out) + rng.randbytes(32)


class FakeSubstrate:
    """Chain state in memory; implements the `bittensor._substrate.Substrate` subset in use."""

    def __init__(self, block: int = 1000) -> None:
        self.token_symbols: dict[int, str] = {}
        self.head = block
        self.subnets: dict[int, _Subnet] = {}
        self.calls: list[str] = []  # every substrate method the SDK invoked, for the report
        self._nonces: dict[str, int] = {}
        self._signed: dict[tuple[str, int], tuple[_Composed, Any, str]] = {}
        self._receipts: dict[tuple[str, int], ExtrinsicResult] = {}
        self._lock = threading.Lock()

    # -- test controls ---------------------------------------------------------------------

    def create_subnet(self, netuid: int, owner_hotkey: str, owner_coldkey: str, *,
                      tempo: int = 360, rate_limit: int = 100, max_weights_limit: int = U16_MAX,
                      max_validators: int = 64) -> None:
        """Add a subnet with the owner's hotkey at uid 0."""
        sub = _Subnet(owner_hotkey, owner_coldkey, tempo, rate_limit, max_weights_limit,
                      max_validators, self.head)
        sub.neurons.append(_Neuron(owner_hotkey, owner_coldkey, self.head))
        self.subnets[netuid] = sub

    def add_stake(self, netuid: int, hotkey: str, tao: float) -> None:
        """Stake TAO on a registered hotkey."""
        n = next(n for n in self.subnets[netuid].neurons if n.hotkey == hotkey)
        n.stake_rao += int(tao * RAO_PER_TAO)

    def advance_blocks(self, n: int) -> int:
        """Produce `n` empty blocks."""
        self.head += int(n)
        return self.head

    # -- Substrate: lifecycle and blocks ------------------------------------------------------

    def balance(self, rao: int, netuid: int = 0) -> Balance:
        return Balance.from_rao(int(rao), netuid) if netuid else Balance.from_rao(int(rao))

    async def connect(self) -> None:
        self.calls.append("connect")

    async def close(self) -> None:
        self.calls.append("close")

    async def block_hash(self, block: int | None = None) -> str | None:
        self.calls.append("block_hash")
        number = self.head if block is None else int(block)
        return None if number > self.head else "0x" + f"{number:064x}"

    async def block_number(self) -> int:
        self.calls.append("block_number")
        return self.head

    async def finalized_block_number(self) -> int:
        return self.head

    async def block_time(self) -> float:
        self.calls.append("block_time")
        return 12.0

    async def events(self, block_hash: str | None = None) -> list[dict]:
        return []

    # -- Substrate: reads ---------------------------------------------------------------------

    def _permits(self, sub: _Subnet) -> set[int]:
        staked = [(n.stake_rao, -uid) for uid, n in enumerate(sub.neurons) if n.stake_rao > 0]
        return {-negative for _, negative in sorted(staked, reverse=True)[: sub.max_validators]}

    async def query(self, module: str, storage_function: str, params: list | None = None,
                    block_hash: str | None = None) -> Any:
        self.calls.append(f"query:{module}.{storage_function}")
        p = list(params or [])
        sub = self.subnets.get(int(p[0])) if p and isinstance(p[0], int) else None
        key = (module, storage_function)
        if key == ("SubtensorModule", "Uids"):
            if sub is None:
                return None
            return next((uid for uid, n in enumerate(sub.neurons) if n.hotkey == p[1]), None)
        if key == ("SubtensorModule", "NetworksAdded"):
            return sub is not None
        if sub is None:
            raise ChainError(f"fake substrate: subnet {p[:1]} does not exist")
        scalars = {
            "CommitRevealWeightsEnabled": False,
            "WeightsSetRateLimit": sub.rate_limit,
            "MinAllowedWeights": 0,
            "MaxWeightsLimit": sub.max_weights_limit,
            "SubnetEpochConsensus": "Yuma",
            "Tempo": sub.tempo,
            "Burn": sub.burn_rao,
            "CollateralLockShare": 0,
        }
        if module == "SubtensorModule" and storage_function in scalars:
            return scalars[storage_function]
        if key == ("SubtensorModule", "LastUpdate"):
            return [n.last_update for n in sub.neurons]
        if key == ("SubtensorModule", "ValidatorPermit"):
            permits = self._permits(sub)
            return [uid in permits for uid in range(len(sub.neurons))]
        raise NotImplementedError(f"fake substrate does not model {module}.{storage_function}")

    async def query_map(self, module: str, storage_function: str, params: list | None = None,
                        block_hash: str | None = None) -> list[tuple[Any, Any]]:
        self.calls.append(f"query_map:{module}.{storage_function}")
        if (module, storage_function) == ("SubtensorModule", "TokenSymbol"):
            return []
        p = list(params or [])
        if (module, storage_function) == ("SubtensorModule", "Weights"):
            sub = self.subnets.get(int(p[0]))
            return [] if sub is None else [(uid, list(r)) for uid, r in sub.weights.items()]
        raise NotImplementedError(f"fake substrate does not model map {module}.{storage_function}")

    async def query_batch(self, module: str, storage_function: str, param_sets: list[list],
                          block_hash: str | None = None) -> list[Any]:
        return [await self.query(module, storage_function, ps, block_hash) for ps in param_sets]

    async def runtime_call(self, api: str, method: str, params: list,
                           block_hash: str | None = None) -> Any:
        self.calls.append(f"runtime:{api}.{method}")
        if (api, method) != ("SubnetInfoRuntimeApi", "get_metagraph"):
            raise NotImplementedError(f"fake substrate does not model runtime {api}.{method}")
        sub = self.subnets.get(int(params[0]))
        if sub is None:
            return None
        permits = self._permits(sub)
        ns = sub.neurons
        return {
            "netuid": int(params[0]), "name": list(b"resbm"), "symbol": list(b"R"),
            "block": self.head, "tempo": sub.tempo, "last_step": self.head - self.head % sub.tempo,
            "blocks_since_last_step": self.head % sub.tempo,
            "owner_hotkey": sub.owner_hotkey, "owner_coldkey": sub.owner_coldkey,
            "network_registered_at": sub.registered_at, "num_uids": len(ns), "max_uids": 256,
            "hotkeys": [n.hotkey for n in ns], "coldkeys": [n.coldkey for n in ns],
            "active": [True] * len(ns),
            "validator_permit": [uid in permits for uid in range(len(ns))],
            "last_update": [n.last_update for n in ns],
            "block_at_registration": [n.registered_at for n in ns],
            "axons": [n.axon or {"ip": 0, "port": 0, "ip_type": 4} for n in ns],
            "total_stake": [n.stake_rao for n in ns], "alpha_stake": [n.stake_rao for n in ns],
            "tao_stake": [0] * len(ns),
        }

    async def constant(self, module: str, name: str) -> Any:
        raise NotImplementedError(f"fake substrate does not model constant {module}.{name}")

    # -- Substrate: calls and submission ------------------------------------------------------

    async def compose(self, call: Any) -> _Composed:
        self.calls.append(f"compose:{call.module}.{call.function}")
        data = json.dumps([call.module, call.function, call.params], default=_jsonable,
                          sort_keys=True).encode()
        return _Composed(call.module, call.function, dict(call.params), data)

    async def estimate_fee(self, call: Any, keypair: Any) -> Balance:
        return Balance.from_rao(0)

    async def account_next_index(self, address: str) -> int:
        return self._nonces.get(address, 0)

    async def mev_next_key(self) -> bytes:
        self.calls.append("mev_next_key")
        return _ml_kem_768_public_key(self.head)

    async def sign_extrinsic(self, call: _Composed, keypair: Any, *, nonce: int,
                             period: int) -> tuple[bytes, str]:
        self.calls.append(f"sign_extrinsic:{call.function}")
        raw = call.data + nonce.to_bytes(8, "little") + bytes(keypair.sign(call.data))
        ext_hash = "0x" + hashlib.blake2b(raw, digest_size=32).hexdigest()
        self._signed[(keypair.ss58_address, nonce)] = (call, keypair, ext_hash)
        return raw, ext_hash

    async def find_extrinsic(self, extrinsic_hash: str, block_hash: str) -> ExtrinsicResult | None:
        self.calls.append("find_extrinsic")
        return self._receipts.get((extrinsic_hash, int(block_hash, 16)))

    async def submit(self, call: _Composed, keypair: Any, *, nonce: int | None = None,
                     period: int | None = None, wait_for_inclusion: bool = True,
                     wait_for_finalization: bool = True) -> ExtrinsicResult:
        self.calls.append(f"submit:{call.module}.{call.function}")
        who = keypair.ss58_address
        nonce = self._nonces.get(who, 0) if nonce is None else nonce
        with self._lock:
            self.head += 1  # the extrinsic lands in a new block
            block_hash = "0x" + f"{self.head:064x}"
            self._nonces[who] = max(self._nonces.get(who, 0), nonce + 1)
            if (call.module, call.function) == ("MevShield", "submit_encrypted"):
                # The block author decrypts the carrier: the inner extrinsic the executor signed
                # at nonce + 1 is dispatched in the same block.
                inner = self._signed.pop((who, nonce + 1), None)
                if inner is None:
                    return _failed("fake substrate: no inner extrinsic for this carrier", None)
                inner_call, inner_kp, inner_hash = inner
                self._nonces[who] = nonce + 2
                receipt = self._dispatch(inner_call, inner_kp.ss58_address)
                self._receipts[(inner_hash, self.head)] = _included(receipt, block_hash,
                                                                    self.head, 1)
                return ExtrinsicResult(True, "included", block_hash, f"{self.head}-0")
            return _included(self._dispatch(call, who), block_hash, self.head, 0)

    def _dispatch(self, call: _Composed, origin: str) -> ExtrinsicResult:
        p = call.params
        sub = self.subnets.get(int(p.get("netuid", -1)))
        if sub is None:
            return _failed("The subnet does not exist.", "SubnetNotExists")
        if call.function == "burned_register":
            if any(n.hotkey == p["hotkey"] for n in sub.neurons):
                return _failed("Hotkey already registered.", "HotKeyAlreadyRegisteredInSubNet")
            sub.neurons.append(_Neuron(p["hotkey"], origin, self.head))
            return ExtrinsicResult(True, "registered")
        uid = next((u for u, n in enumerate(sub.neurons) if n.hotkey == origin), None)
        if uid is None:
            return _failed("The hotkey is not registered in the subnet.",
                           "HotKeyNotRegisteredInSubNet")
        if call.function == "serve_axon":
            ipaddress.ip_address(int(p["ip"]))
            sub.neurons[uid].axon = {k: p[k] for k in ("ip", "port", "ip_type", "protocol",
                                                       "version")}
            return ExtrinsicResult(True, "axon served")
        if call.function == "set_mechanism_weights":
            return self._set_weights(sub, uid, list(p["dests"]), list(p["weights"]))
        return _failed(f"fake substrate does not model {call.module}.{call.function}", None)

    def _set_weights(self, sub: _Subnet, uid: int, dests: list[int],
                     values: list[int]) -> ExtrinsicResult:
        n = sub.neurons[uid]
        if sub.rate_limit and n.last_update > 0 and self.head - n.last_update < sub.rate_limit:
            return _failed("Setting weights too fast.", "SettingWeightsTooFast")
        if uid not in self._permits(sub):
            return _failed("The neuron has no validator permit.", "NeuronNoValidatorPermit")
        if len(dests) != len(values) or len(set(dests)) != len(dests):
            return _failed("Weight vectors are malformed.", "WeightVecNotEqualSize")
        if any(d >= len(sub.neurons) for d in dests):
            return _failed("A uid is not registered.", "UidVecContainInvalidOne")
        total = sum(values)
        if len(values) > 1 and max(values) * U16_MAX > sub.max_weights_limit * total:
            return _failed("A weight exceeds the max weight limit.", "MaxWeightExceeded")
        top = max(values)
        sub.weights[uid] = [(d, round(v * U16_MAX / top)) for d, v in zip(dests, values)]
        n.last_update = self.head
        return ExtrinsicResult(True, "weights set")


def _included(result: ExtrinsicResult, block_hash: str, block: int, index: int
              ) -> ExtrinsicResult:
    return ExtrinsicResult(result.success, result.message, block_hash, f"{block}-{index}",
                           error=result.error)


def _failed(message: str, name: str | None) -> ExtrinsicResult:
    return ExtrinsicResult(False, message, error=ChainError(message, name))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    return str(value)

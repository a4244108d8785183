"""Settings and start-up checks shared by the miner and the validator.

Settings follow the one scheme of `protocol.settings` (flag > RESBM_* environment > `.env` >
default). The start-up checks turn every configuration mistake into one line and its exit code
(`protocol.exits.Exit`) before the neuron touches the bridge.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import httpx

from protocol.client import split_urls
from protocol.chain.open import check_registered, check_subnet, load_hotkey, open_chain as open_network
from protocol.exits import Exit, Misconfigured, Transient, retry
from protocol.routes import route
from protocol.settings import DEFAULT_BRIDGE_URL, CommonSettings, env_name, flag, load_settings, setup_logging
from resbm.device import auto_device, cuda_count as _cuda_count, mps_available as _mps_available

__all__ = ["NeuronSettings", "env_name", "load_settings", "setup_logging", "load_keypair", "open_chain",
           "resolve_device", "connect_bridge", "start_checks"]


class NeuronSettings(CommonSettings):
    """Settings of both neurons."""

    bridge_url: str = flag(DEFAULT_BRIDGE_URL, "bridge base URL; several bridge processes of one "
                           "run: repeat the flag or separate URLs with commas (the neuron fails "
                           "over between them)", name="bridge.url", repeat=True)
    bridge_wait: float = flag(600.0, "seconds to keep retrying an unreachable bridge at start "
                              "before giving up", name="bridge.wait")
    device: str = flag("auto", "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    link_mbps: float = flag(0.0, "emulate an uplink/downlink of this many Mbit/s for object "
                            "transfers (0 = off)", name="link.mbps")
    link_latency_ms: float = flag(0.0, "emulated one-way latency added to every object transfer",
                                  name="link.latency-ms")
    status_every: float = flag(10.0, "seconds between status lines")
    metrics_port: int = flag(0, "serve Prometheus metrics on this port at /metrics (0 = off)",
                             name="metrics.port")


def load_keypair(s: CommonSettings) -> Any:
    """The hotkey of the configured wallet (`Misconfigured` when missing)."""
    return load_hotkey(s.wallet_name, s.wallet_hotkey, s.wallet_path)


def open_chain(s: CommonSettings) -> Any:
    """The `Chain` named by --subtensor.network / --subtensor.chain_endpoint and --netuid."""
    return open_network(s.network, s.netuid)


def resolve_device(name: str, cuda_count: Optional[Callable[[], int]] = None,
                   mps_available: Optional[Callable[[], bool]] = None) -> str:
    """'auto' -> cuda, then mps, then cpu; a named device must exist here (`Misconfigured` if not).
    The availability checks are injectable for tests."""
    cuda_count = cuda_count or _cuda_count
    mps_available = mps_available or _mps_available
    kind, _, index = name.partition(":")
    if name == "auto":
        return auto_device(cuda_count, mps_available)
    if kind == "cpu" and not index:
        return "cpu"
    if kind == "cuda":
        n = cuda_count()
        i = int(index) if index.isdigit() else (0 if not index else -1)
        if i < 0:
            raise Misconfigured(Exit.USAGE, f"--device {name}: expected cuda or cuda:N")
        if i >= n:
            have = f"{n} CUDA device(s)" if n else "no CUDA device (or a CPU-only torch build)"
            raise Misconfigured(Exit.DEVICE, f"--device {name} but this machine has {have}; "
                                "use --device cpu or auto, or install a CUDA build of torch")
        return name
    if kind == "mps" and not index:
        if not mps_available():
            raise Misconfigured(Exit.DEVICE, f"--device {name} but MPS is not available here; "
                                "use --device cpu or auto")
        return "mps"
    raise Misconfigured(Exit.USAGE, f"--device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")


def _probe_bridge(url: str) -> dict:
    """GET /health once: the bridge's health record, `Transient` when nothing answers."""
    unreachable = Misconfigured(Exit.BRIDGE_UNREACHABLE, (
        f"no bridge answers at {url}; check --bridge.url and that the bridge is running"))
    try:
        resp = httpx.get(url.rstrip("/") + route("health").path, timeout=10.0)
    except httpx.UnsupportedProtocol:
        raise Misconfigured(Exit.USAGE, f"--bridge.url {url!r} is not an http(s):// URL") from None
    except (httpx.TransportError, OSError) as exc:
        raise Transient(f"no answer from {url} ({type(exc).__name__})", unreachable) from None
    if resp.status_code in (502, 503, 504):
        raise Transient(f"{url} answered {resp.status_code}", unreachable)
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code != 200 or not isinstance(data, dict) or not isinstance(data.get("hotkey"), str):
        raise Misconfigured(Exit.NOT_A_BRIDGE, (
            f"{url} answered GET /health with HTTP {resp.status_code} but is not a ResBM bridge; "
            "check --bridge.url (host and port of the bridge)"))
    return data


def _probe_any(urls: list[str]) -> dict:
    """The health record of the first of `urls` that answers (`Transient` when none does)."""
    last: Optional[Transient] = None
    for url in urls:
        try:
            return _probe_bridge(url)
        except Transient as exc:
            last = exc
    assert last is not None
    if len(urls) > 1:
        raise Transient(f"no answer from any of {len(urls)} bridge URLs", Misconfigured(
            Exit.BRIDGE_UNREACHABLE, f"no bridge answers at any of {', '.join(urls)}; check "
            "--bridge.url and that the bridges are running"))
    raise last


def connect_bridge(s: NeuronSettings, log: logging.Logger) -> str:
    """The bridge's hotkey, after checking it is a bridge for our netuid; retries with back-off
    while nothing answers (up to --bridge.wait seconds). With several URLs, the first that
    answers is checked (the others are tried when it fails later)."""
    try:
        urls = split_urls(s.bridge_url)
    except ValueError:
        raise Misconfigured(Exit.USAGE, "--bridge.url is empty; give the bridge's URL") from None
    health = retry(f"bridge {s.bridge_url}", lambda: _probe_any(urls), log,
                   give_up_after=s.bridge_wait, first=1.0, cap=30.0)
    netuid = health.get("netuid")
    if netuid is not None and int(netuid) != s.netuid:
        raise Misconfigured(Exit.BRIDGE_MISMATCH, (
            f"the bridge at {s.bridge_url} serves netuid {netuid}, this neuron is set to netuid "
            f"{s.netuid}; fix --netuid or --bridge.url"))
    return health["hotkey"]


def start_checks(s: NeuronSettings, log: logging.Logger, need_permit: bool = False) -> tuple[Any, Any, int]:
    """(keypair, chain, uid) after checking the wallet, the chain, the subnet, the registration
    and, for validators, the permit."""
    keypair = load_keypair(s)
    chain = open_chain(s)
    mg = check_subnet(chain, s.network, s.netuid)
    uid = check_registered(mg, keypair.ss58_address, s.network, s.netuid, need_permit=need_permit)
    return keypair, chain, uid

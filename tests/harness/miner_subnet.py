"""A real subnet on loopback for miner tests: rclone S3, a LocalChain, the bridge process, and
miners in threads or as `python neurons/miner.py` processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from neurons.miner_loop import Miner
from neurons.transfer import ObjectTransfer
from protocol.bridge_client import BridgeClient
from protocol.routes import route
from tests.harness.waiting import wait_for  # noqa: F401  (re-exported for the miner tests)
from tests.servers import REPO, BridgeProcess, S3Server, start_bridge, start_s3

__all__ = ["MODEL", "run_config", "Subnet", "start_subnet", "MinerThread", "MinerProc", "wait_for", "set_threads"]

# 2 layers over 2 stages, d 32 -> k 4: a hop computes in milliseconds on one CPU thread.
MODEL = dict(d_model=32, n_layers=2, n_heads=2, seq_len=32, n_stages=2, bottleneck_dim=4)


def run_config(**over: Any) -> dict[str, Any]:
    """A tiny RunConfig mapping whose model builds (override any field)."""
    cfg = dict(run_id="miner-test", model=dict(MODEL), n_stages=2, batch_size=2, micro_batches_per_step=2,
               inner_steps_per_round=2, samples_per_round=4, muon_lr=0.02, adamw_lr=0.01, weight_decay=0.0,
               warmup_steps=0, total_rounds=3, outer_lr=1.0, outer_momentum=0.0, data_seed=5, init_seed=7,
               lease_seconds=20.0, max_object_bytes=1 << 16, merge_timeout_seconds=30.0, max_attempts=3)
    cfg.update(over)
    return cfg


@dataclass
class Subnet:
    """S3 server + chain file + bridge process; `client(kp)` talks to the bridge as `kp`."""

    root: Path
    s3: S3Server
    bridge: BridgeProcess
    chain_path: Path
    keys: dict[str, list[Any]]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def client(self, kp: Any) -> BridgeClient:
        """A signed client for keypair `kp`."""
        return BridgeClient(kp, self.bridge.url, self.bridge.hotkey)

    def metrics(self) -> dict:
        """GET /v1/metrics as the first miner."""
        return self.client(self.keys["miners"][0]).get(route("metrics").path)

    def stop(self) -> None:
        """Stop every process started here (miners first)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        self.bridge.stop()
        self.s3.stop()


def start_subnet(root: Path, cfg: dict[str, Any], miners: int, wallets: bool = False,
                 bridge_flags: tuple[str, ...] = ()) -> Subnet:
    """Start S3, a LocalChain with `miners` registered hotkeys (bittensor wallets on disk when
    `wallets`, so processes can load them) and the bridge."""
    from bittensor.sp_core import Keypair
    from protocol.chain import LocalChain

    chain_path = root / "chain.sqlite"
    chain = LocalChain(chain_path, 1)
    owner = Keypair.create_from_uri("//owner")
    chain.create_subnet(owner, max_uids=64)
    keys: dict[str, list[Any]] = {"owner": [owner], "miners": []}
    for i in range(miners):
        if wallets:
            import bittensor as bt
            w = bt.Wallet(name=f"miner{i}", hotkey="default", path=str(root / "wallets"))
            w.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
            kp = w.hotkey
        else:
            kp = Keypair.create_from_uri(f"//miner-test-{i}")
        chain.register(kp)
        keys["miners"].append(kp)
    s3 = start_s3(root / "s3")
    try:
        bridge = start_bridge(root / "bridge", cfg, chain_path, s3, extra=bridge_flags)
    except BaseException:
        s3.stop()  # a bridge that never came up leaves no S3 server behind
        raise
    return Subnet(root=root, s3=s3, bridge=bridge, chain_path=chain_path, keys=keys)


class MinerThread:
    """An in-process Miner serving in a daemon thread (register happens in the caller's thread)."""

    def __init__(self, net: Subnet, kp: Any, max_hops: int = 4, make: Callable[..., Miner] = Miner):
        self.transfer = ObjectTransfer()
        self.miner = make(net.client(kp), self.transfer, device="cpu", max_hops=max_hops)
        self.assignment = self.miner.register()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"miner-s{self.assignment.stage}")

    def _run(self) -> None:
        try:
            self.miner.run_forever()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def start(self) -> "MinerThread":
        """Start serving."""
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        """Wait for the miner to finish (the run is done); re-raise its error."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.miner.stop.set()
            self.thread.join(10)
            raise AssertionError(f"miner of stage {self.assignment.stage} still running after {timeout}s")
        self.miner.close()
        self.transfer.close()
        if self.error is not None:
            raise self.error


class MinerProc:
    """`python neurons/miner.py` for wallet miner{i}, logging to a file, with a status file."""

    def __init__(self, net: Subnet, i: int, extra: tuple[str, ...] = ()):
        self.net, self.i = net, i
        self.log = net.root / f"miner{i}.log"
        self.status_file = net.root / f"miner{i}.status.json"
        self.argv = [sys.executable, str(REPO / "neurons" / "miner.py"), "--wallet.name", f"miner{i}",
                     "--wallet.hotkey", "default", "--wallet.path", str(net.root / "wallets"), "--netuid", "1",
                     "--subtensor.network", f"localchain:{net.chain_path}", "--bridge.url", net.bridge.url,
                     "--device", "cpu", "--threads", "1", "--status-every", "1", "--env-file", os.devnull,
                     "--status-file", str(self.status_file), *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MinerProc":
        """Start (or restart) the process, appending to its log."""
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        env = {k: v for k, v in env.items() if not k.startswith("RESBM_")}
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.argv, cwd=str(REPO), env=env, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.net.procs.append(self.proc)
        return self

    def text(self) -> str:
        """The log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        """Send `sig` to the process."""
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, the crash case."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def set_threads() -> None:
    """Keep in-process compute on one thread (the machine is shared)."""
    torch.set_num_threads(1)

"""The processes of a local subnet: S3 server, LocalChain, wallets, bridge, miners, validator.

Every neuron runs as its own process with the same flags a production deployment uses; only
the endpoints (loopback) and sizes differ. Children die with the launcher (PR_SET_PDEATHSIG)
and are stopped in order on exit, so Ctrl-C leaves no orphans. With `netlab` (kernel links), the
bridge and S3 run in the emulated network's hub namespace and every miner and validator in a
namespace of its own behind a shaped link (scripts/netlab.py), so every request pays the link.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from protocol.routes import route
from scripts.gpu_placement import NCCL_ENV, child_env, plan, validator_gpu
from scripts.local_servers import S3Server, die_with_parent, free_port, start_s3, stop_process, wait_http
from scripts.netlab import NetLab

__all__ = ["Neuron", "Cluster"]

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Neuron:
    """One child process and how to start it again."""

    name: str
    argv: list[str]
    log_path: Path
    proc: Optional[subprocess.Popen] = None
    restarts: int = 0
    env: dict = field(default_factory=dict)
    preexec: Optional[Callable[[], None]] = None  # e.g. enter its network namespace (then die with parent)

    def start(self) -> None:
        """Start (or restart) the process, appending to its log."""
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep carried packages
        env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **NCCL_ENV)  # NVLink multicast off
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=self.preexec or die_with_parent)

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> Optional[int]:
        """SIGTERM and wait (SIGKILL after a grace period)."""
        return stop_process(self.proc) if self.proc is not None else None


@dataclass
class Cluster:
    """Builds and runs every part of the local subnet under `workdir`."""

    workdir: Path
    run_config: dict
    miners_per_stage: int
    device: str = "cpu"
    validators: int = 1
    link_mbps: float = 0.0
    link_latency_ms: float = 0.0
    cheaters: list[str] = field(default_factory=list)  # adversaries, one per stage, joining first
    netuid: int = 1
    s3_endpoint: str = ""
    s3_keys: tuple[str, str] = ("", "")
    threads_per_miner: int = 1
    miner_args: list[str] = field(default_factory=list)  # extra flags for every miner (e.g. --dtype bfloat16)
    gpus: int = 0  # > 0: miners start one at a time, each on its GPU (scripts/gpu_placement.py)
    netlab: Optional[NetLab] = None  # kernel links: neurons in namespaces (not started yet; start() builds it)
    s3: Optional[S3Server] = None
    bridge: Optional[Neuron] = None
    miners: list[Neuron] = field(default_factory=list)
    validator_procs: list[Neuron] = field(default_factory=list)
    hotkeys: dict[str, str] = field(default_factory=dict)

    @property
    def chain_path(self) -> Path:
        """The LocalChain SQLite file."""
        return self.workdir / "chain.sqlite"

    @property
    def wallet_path(self) -> Path:
        """Where the neurons' wallets live."""
        return self.workdir / "wallets"

    def start(self) -> None:
        """Start S3, create the chain and wallets, then the bridge, miners and validators."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        n_neurons = self.run_config["n_stages"] * self.miners_per_stage + len(self.cheaters) + self.validators
        slots = plan(self.run_config["n_stages"], n_neurons - self.validators, self.gpus)  # before any process
        if self.netlab is not None:
            self.netlab.neurons = n_neurons
            self.netlab.manifest = self.workdir / "netlab.json"
            self.netlab.start()
            self.link_mbps = self.link_latency_ms = 0.0  # the kernel shapes every byte; no second emulation
        if self.s3_endpoint:
            self.s3 = None
        else:
            lab = self.netlab
            self.s3 = start_s3(self.workdir / "s3", log_path=self.workdir / "logs" / "s3.log",
                               host=lab.services_addr if lab else "127.0.0.1",
                               preexec_fn=lab.in_hub(die_with_parent) if lab else None)
            self.s3_endpoint, self.s3_keys = self.s3.endpoint, (self.s3.access_key, self.s3.secret_key)
        self._publish_dataset()
        self._make_chain()
        self._start_bridge()
        n_honest = self.run_config["n_stages"] * self.miners_per_stage
        for i in range(n_honest + len(self.cheaters)):
            cheat = self.cheaters[i - n_honest] if i >= n_honest else "honest"
            # a cheater runs the drills entry point; the shipped miner has no cheat flag
            script = ["-m", "drills.miner", "--cheat", cheat] if cheat != "honest" else ["neurons/miner.py"]
            self.miners.append(self._neuron(f"miner{i}", script, [
                "--threads", str(self.threads_per_miner),
                "--status-file", str(self.workdir / "logs" / f"miner{i}.status.json"), *self.miner_args]))
        for i in range(self.validators):
            self.validator_procs.append(self._neuron(f"validator{i}", ["neurons/validator.py"], [
                "--state-path", str(self.workdir / f"validator{i}.state.json"), "--audit.fraction",
                str(self.run_config.get("incentives", {}).get("audit_fraction", 0.5))]))
        # Cheaters register first, one at a time, so the bridge's balancing puts each on its own
        # stage (one adversary per stage) and they are there from round 0; then everyone else.
        # With GPUs, honest miners also register one at a time: the j-th to register serves stage
        # j mod S (the bridge's balancing), which is what its slot's GPU was chosen for.
        order = self.miners[n_honest:] + self.miners[:n_honest]
        for j, n in enumerate(order):
            n.env.update(child_env(slots[j].gpu))
        for n in self.validator_procs:
            n.env.update(child_env(validator_gpu(self.gpus)))
        for k, n in enumerate(self.miners[n_honest:]):
            n.start()
            self._wait_miners(k + 1)
        for n in self.validator_procs:
            n.start()
        for i, n in enumerate(self.miners[:n_honest]):
            n.start()
            if self.gpus:
                self._wait_miners(len(self.cheaters) + i + 1)

    def _wait_miners(self, count: int, timeout: float = 120.0) -> None:
        from protocol.bridge_client import BridgeClient
        client = BridgeClient(self.owner_keypair, self.bridge_url, None)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(client.metrics().miners) >= count:
                return
            time.sleep(0.3)
        raise TimeoutError(f"only some of {count} miners registered with the bridge in {timeout:.0f}s")

    def _publish_dataset(self) -> None:
        """Upload the shipped corpus to the bucket and name it in the run config, as a real run does."""
        from resbm import data
        from scripts.prepare_dataset import upload_folder

        bucket = self.s3.bucket if self.s3 is not None else "resbm"
        self.run_config["dataset"] = upload_folder(data.default_data_dir(), f"s3://{bucket}/datasets/shipped",
                                                   self.s3_endpoint, self.s3_keys)

    def _make_chain(self) -> None:
        import bittensor as bt
        from bittensor.sp_core import Keypair
        from protocol.chain import LocalChain

        chain = LocalChain(self.chain_path, self.netuid, seconds_per_block=1.0)
        names = ["owner"] + [f"validator{i}" for i in range(self.validators)]
        names += [f"miner{i}" for i in range(self.run_config["n_stages"] * self.miners_per_stage + len(self.cheaters))]
        keys = {}
        for name in names:
            w = bt.Wallet(name=name, hotkey="default", path=str(self.wallet_path))
            w.regenerate_coldkey(mnemonic=Keypair.generate_mnemonic(12), use_password=False, overwrite=True, suppress=True)
            w.regenerate_hotkey(mnemonic=Keypair.generate_mnemonic(12), use_password=False, overwrite=True, suppress=True)
            keys[name] = w.hotkey
            self.hotkeys[name] = w.hotkey.ss58_address
        chain.create_subnet(keys["owner"], tempo=20, weights_rate_limit=5)
        for name in names[1:]:
            chain.register(keys[name])
        for i in range(self.validators):
            chain.add_stake(self.hotkeys[f"validator{i}"], 1000.0)
        self.chain = chain
        self.owner_keypair = keys["owner"]

    def _start_bridge(self) -> None:
        cfg_path = self.workdir / "run.yaml"
        cfg_path.write_text(yaml.safe_dump(self.run_config))
        port = free_port()
        host = self.netlab.services_addr if self.netlab else "127.0.0.1"
        self.bridge_url = f"http://{host}:{port}"
        argv = [sys.executable, "-m", "bridge", "--run-config", str(cfg_path), "--host", host,
                "--port", str(port), "--db", str(self.workdir / "bridge.sqlite"),
                "--subtensor.network", f"localchain:{self.chain_path}", "--netuid", str(self.netuid),
                "--wallet.name", "owner", "--wallet.hotkey", "default", "--wallet.path", str(self.wallet_path),
                "--s3-endpoint", self.s3_endpoint, "--s3-access-key", self.s3_keys[0],
                "--s3-secret-key", self.s3_keys[1], "--health-timeout", "20"]
        self.bridge = Neuron("bridge", argv, self.workdir / "logs" / "bridge.log",
                             preexec=self.netlab.in_hub(die_with_parent) if self.netlab else None)
        self.bridge.start()
        wait_http(self.bridge_url + route("health").path, timeout=180, proc=self.bridge.proc)  # a loaded box is slow

    def restart_bridge(self) -> None:
        """Kill the bridge without warning and start it again on the same database."""
        self.bridge.kill()
        self.bridge.restarts += 1
        self.bridge.start()
        wait_http(self.bridge_url + route("health").path, timeout=180, proc=self.bridge.proc)  # a loaded box is slow

    def _neuron(self, name: str, script: list[str], extra: list[str]) -> Neuron:
        argv = [sys.executable, *script, "--wallet.name", name, "--wallet.hotkey", "default",
                "--wallet.path", str(self.wallet_path), "--netuid", str(self.netuid),
                "--subtensor.network", f"localchain:{self.chain_path}", "--bridge.url", self.bridge_url,
                "--device", self.device, "--link.mbps", str(self.link_mbps),
                "--link.latency-ms", str(self.link_latency_ms), "--status-every", "15", *extra]
        cache = {"RESBM_DATA_CACHE": str(self.workdir / "data-cache" / name)}  # each neuron its own, as on its own host
        preexec = None
        if self.netlab is not None:  # neuron k of the network: miners first, then validators
            k = len(self.miners) + len(self.validator_procs)
            preexec = self.netlab.in_neuron(k, die_with_parent)
        return Neuron(name, argv, self.workdir / "logs" / f"{name}.log", env=cache, preexec=preexec)

    def miner_status(self) -> dict[str, dict]:
        """The miners' last status snapshots (hops, bytes, compute fraction)."""
        out = {}
        for n in self.miners:
            p = self.workdir / "logs" / f"{n.name}.status.json"
            if p.exists():
                try:
                    out[n.name] = json.loads(p.read_text())
                except ValueError:
                    pass
        return out

    def stop(self) -> None:
        """Stop validators and miners (SIGTERM: they finish their hops), then the bridge and S3."""
        for n in self.validator_procs + self.miners:
            if n.alive():
                n.proc.terminate()
        for n in self.validator_procs + self.miners:
            n.stop()
        if self.bridge is not None:
            self.bridge.stop()
        if self.s3 is not None:
            self.s3.stop()
        if self.netlab is not None:
            self.netlab.close()

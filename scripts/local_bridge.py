"""A bridge process and a LocalChain with registered keypairs on 127.0.0.1, for tests and the
benchmarks (which must not import the uninstalled `tests` package)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from protocol.routes import route
from scripts.local_servers import S3Server, die_with_parent, free_port, stop_process, wait_http

__all__ = ["REPO", "TINY_MODEL", "make_chain", "tiny_run_config", "code_bytes", "BridgeProcess",
           "start_bridge", "start_bridges"]

REPO = Path(__file__).resolve().parent.parent


def make_chain(path: Path, miners: int = 4, validators: int = 1, netuid: int = 1,
               prefix: str = "m") -> tuple[Any, dict[str, list[Any]]]:
    """A LocalChain with an owner, `miners` miner keypairs and staked validators."""
    from bittensor.sp_core import Keypair

    from protocol.chain import LocalChain
    chain = LocalChain(path, netuid)
    owner = Keypair.create_from_uri("//owner")
    chain.create_subnet(owner, max_uids=max(256, miners + validators + 1))
    keys: dict[str, list[Any]] = {"owner": [owner], "miners": [], "validators": []}
    for i in range(miners):
        kp = Keypair.create_from_uri(f"//{prefix}{i}")
        chain.register(kp)
        keys["miners"].append(kp)
    for i in range(validators):
        kp = Keypair.create_from_uri(f"//validator{i}")
        chain.register(kp)
        chain.add_stake(kp.ss58_address, 1000.0 + i)
        keys["validators"].append(kp)
    return chain, keys


TINY_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16, "n_stages": 2,
              "bottleneck_dim": 4}  # its code is 422 bytes


def tiny_run_config(**over: Any) -> dict[str, Any]:
    """A small RunConfig mapping whose model builds, for tests (override any field; a `model`
    override is merged into the tiny model)."""
    model = dict(TINY_MODEL)
    given = dict(over.pop("model", None) or {})
    if "bottleneck_ratio" in given:
        model.pop("bottleneck_dim")
    model.update(given)
    if "n_stages" in over:
        model.update(n_stages=over["n_stages"], n_layers=max(over["n_stages"], given.get("n_layers", 0)))
    cfg = dict(run_id="test-run", model=model, n_stages=2,
               batch_size=1, micro_batches_per_step=2, inner_steps_per_round=2,
               samples_per_round=8, muon_lr=0.02, adamw_lr=0.003, total_rounds=2,
               data_seed=1, init_seed=2, lease_seconds=30.0, max_object_bytes=4096,
               merge_timeout_seconds=30.0, max_attempts=3,
               sync_mode="state")  # tests/harness/fake_worker.py merges whole states; override for sharded
    cfg.update(over)
    return cfg


def code_bytes(run_config: dict[str, Any]) -> int:
    """The exact size of one hop output of a run (what a lease must declare)."""
    from bridge.codespec import code_spec
    from protocol.messages import RunConfig
    return code_spec(RunConfig(**run_config)).nbytes


@dataclass
class BridgeProcess:
    """A `python -m bridge` process on a free loopback port."""

    url: str
    hotkey: str
    proc: subprocess.Popen
    db: Path | str  # the SQLite file, or the postgresql:// URL
    args: list[str] = field(default_factory=list)
    log_path: Optional[Path] = None

    def kill(self) -> None:
        """SIGKILL: the crash case (no clean shutdown)."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Terminate cleanly."""
        stop_process(self.proc)

    def restart(self) -> "BridgeProcess":
        """Start again with the same flags (same DB, same port)."""
        return _launch(self.args, self.url, self.hotkey, self.db, self.log_path)


def _spawn(args: list[str], log_path: Optional[Path]) -> subprocess.Popen:
    # from the calling thread: the child is signalled when that thread ends (PR_SET_PDEATHSIG)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "bridge", *args], cwd=str(REPO), env=env,
                            stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


def _launch(args: list[str], url: str, hotkey: str, db: Path | str,
            log_path: Optional[Path], timeout: float = 60.0) -> BridgeProcess:
    proc = _spawn(args, log_path)
    wait_http(url + route("health").path, timeout=timeout, proc=proc)
    return BridgeProcess(url=url, hotkey=hotkey, proc=proc, db=db, args=args, log_path=log_path)


def start_bridges(workdirs: list[Path], run_config: dict[str, Any], chain_path: Path,
                  s3: Optional[S3Server], db_url: str, extra: tuple[str, ...] = (),
                  timeout: float = 180.0) -> list[BridgeProcess]:
    """Several bridge processes serving one run from the PostgreSQL database `db_url` (one
    folder each for its run YAML and log), started side by side; returns once all answer."""
    starting = [start_bridge(w, run_config, chain_path, s3, extra=extra, db_url=db_url, wait=False)
                for w in workdirs]
    for b in starting:
        wait_http(b.url + route("health").path, timeout=timeout, proc=b.proc)
    return starting


def start_bridge(workdir: Path, run_config: dict[str, Any], chain_path: Path,
                 s3: Optional[S3Server], hotkey_uri: str = "//bridge", netuid: int = 1,
                 extra: tuple[str, ...] = (), db_url: Optional[str] = None,
                 timeout: float = 60.0, wait: bool = True) -> BridgeProcess:
    """Write the run YAML and start the bridge process; returns once /health answers (at once
    when not `wait`). `db_url`: a postgresql:// URL to keep the state in (default: a SQLite
    file in `workdir`); several bridges on one URL serve one run (`start_bridges`)."""
    from bittensor.sp_core import Keypair
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config))
    port = free_port()
    db: Path | str = db_url or workdir / "bridge.sqlite"
    args = ["--run-config", str(cfg_path), "--host", "127.0.0.1", "--port", str(port),
            "--db", str(db), "--subtensor.network", f"localchain:{chain_path}", "--netuid", str(netuid),
            "--hotkey-uri", hotkey_uri, *extra]
    if s3 is not None:
        args += ["--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket,
                 "--s3-access-key", s3.access_key, "--s3-secret-key", s3.secret_key]
    hotkey = Keypair.create_from_uri(hotkey_uri).ss58_address
    url = f"http://127.0.0.1:{port}"
    if not wait:
        return BridgeProcess(url=url, hotkey=hotkey, proc=_spawn(args, workdir / "bridge.log"),
                             db=db, args=args, log_path=workdir / "bridge.log")
    return _launch(args, url, hotkey, db, workdir / "bridge.log", timeout)

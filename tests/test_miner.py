"""Miner tests: the shared harness (a real subnet on loopback: rclone S3, LocalChain, bridge process;
miners in threads or as `python neurons/miner.py` processes), bad-input handling and settings.

The other tests/test_miner_*.py files import the harness from here."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from neurons.miner_loop import Miner
from neurons.transfer import ObjectTransfer
from protocol.bridge_client import BridgeClient
from protocol.routes import route
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


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll `pred` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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
    bridge = start_bridge(root / "bridge", cfg, chain_path, s3, extra=bridge_flags)
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


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
import hashlib  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

from neurons import miner_loop  # noqa: E402
from neurons.cli import env_name, load_settings  # noqa: E402
from neurons.miner import MinerSettings  # noqa: E402
from neurons.miner import build_parser as miner_parser  # noqa: E402
from resbm.train import pick_device  # noqa: E402
from resbm import codec  # noqa: E402


def _corrupted(kind: str, t: torch.Tensor, wire_codec: str) -> tuple[bytes, str]:
    """(blob, sha256 reported to the bridge) of an output corrupted the way `kind` says."""
    honest = codec.encode(t, wire_codec)
    if kind == "bad_hash":  # the object changes after its sha256 was recorded
        blob = bytearray(honest)
        blob[len(blob) // 2] ^= 0xFF
        return bytes(blob), hashlib.sha256(honest).hexdigest()
    if kind == "bad_shape":  # a well-formed object of the same size but another shape
        b, s, k = t.shape
        blob = codec.encode(t.reshape(b, s * 2, k // 2), wire_codec)
    else:  # "nonfinite": a NaN in the values, with a valid inner checksum
        body = bytearray(honest[:-32])
        body[-2:] = b"\xc0\x7f"  # bf16 NaN
        blob = bytes(body) + hashlib.sha256(bytes(body)).digest()
    assert len(blob) == len(honest)
    return blob, hashlib.sha256(blob).hexdigest()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["bad_hash", "bad_shape", "nonfinite"])
def test_corrupted_input_is_reported_and_the_miner_keeps_working(tmp_path, monkeypatch, kind):
    set_threads()
    cfg = run_config(run_id=f"bad-{kind.replace('_', '-')}", samples_per_round=2, inner_steps_per_round=1,
                     total_rounds=2, max_attempts=1)
    net = start_subnet(tmp_path, cfg, miners=2)
    corrupted = threading.Event()
    honest_encode = miner_loop.encode_output

    def faulty_encode(t: torch.Tensor, wire_codec: str) -> tuple[bytes, str]:
        if not corrupted.is_set():  # the first output the stage-0 miner uploads is bad
            corrupted.set()
            return _corrupted(kind, t, wire_codec)
        return honest_encode(t, wire_codec)

    monkeypatch.setattr(miner_loop, "encode_output", faulty_encode)
    try:
        m0 = MinerThread(net, net.keys["miners"][0])
        m1 = MinerThread(net, net.keys["miners"][1])
        assert (m0.assignment.stage, m1.assignment.stage) == (0, 1)
        m0.start()
        wait_for(corrupted.is_set, 20, "the stage-0 miner to upload its first output")
        m1.start()
        m0.join(60), m1.join(60)
        metrics = net.metrics()
    finally:
        net.stop()
    assert m1.miner.status.bad_inputs == 1
    # the bridge checked the object and charged its producer; with max_attempts=1 the redo
    # budget is spent, so the sample ends under that reason, and nothing else is lost
    assert metrics["abandon_reasons"] == {"bad output after 1 attempts": 1}, metrics["abandon_reasons"]
    assert metrics["completed_total"] == 3 and metrics["abandoned_total"] == 1
    by_key = {m["hotkey"]: m for m in metrics["miners"]}
    assert by_key[net.keys["miners"][0].ss58_address]["bad_outputs"] == 1
    assert by_key[net.keys["miners"][1].ss58_address]["false_claims"] == 0
    # and the miner that saw the bad object kept working through the next round
    assert m1.miner.state.round == 2 and m1.miner.status.hops_done == 3


def test_env_example_documents_every_setting():
    from bridge.__main__ import build_parser as bridge_parser
    from neurons.validator import build_parser as validator_parser
    names = set()
    for parser in (miner_parser(), validator_parser(), bridge_parser()):
        names |= {env_name(a.option_strings[0].lstrip("-")) for a in parser._actions
                  if a.option_strings and a.dest != "help"}
    text = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(RESBM_[A-Z0-9_]+)=", text, flags=re.M))
    assert documented == names, (sorted(names - documented), sorted(documented - names))


def test_env_file_sets_flags_and_command_line_wins(tmp_path):
    env_file = tmp_path / "miner.env"
    env_file.write_text("RESBM_MAX_HOPS=7\nRESBM_WALLET_NAME=from-env\nRESBM_LOGGING_DEBUG=true\n")
    saved = dict(os.environ)
    try:
        for k in [k for k in os.environ if k.startswith("RESBM_")]:
            del os.environ[k]
        os.environ["RESBM_THREADS"] = "3"
        os.environ["RESBM_MAX_HOPS"] = "5"  # the environment beats the .env file
        args = load_settings(MinerSettings, ["--env-file", str(env_file), "--wallet.name", "from-flag"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert args.max_hops == 5 and args.threads == 3 and args.logging_debug is True
    assert args.wallet_name == "from-flag"
    assert args.dtype == "float32"  # untouched default


def test_pick_device_prefers_an_accelerator_unless_named():
    assert str(pick_device("cpu")) == "cpu"
    want = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    assert str(pick_device("auto")) == want


def _flaky_server(fail_first: int, body: bytes):
    """A loopback HTTP server: the first `fail_first` GETs answer 503, then 200 with `body`; PUT 403."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls = {"GET": 0, "PUT": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            calls["GET"] += 1
            code = 503 if calls["GET"] <= fail_first else 200
            data = b"busy" if code == 503 else body
            self.send_response(code)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self):
            calls["PUT"] += 1
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(403)
            self.send_header("content-length", "0")
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, calls, f"http://127.0.0.1:{srv.server_address[1]}/obj"


def test_transfer_retries_transient_errors_and_not_permanent_ones():
    from neurons.transfer import TransferError
    srv, calls, url = _flaky_server(2, b"x" * 100)
    t = ObjectTransfer(tries=4)
    try:
        assert t.get(url, max_bytes=100) == b"x" * 100
        assert calls["GET"] == 3 and t.stats.retries == 2 and t.stats.bytes_down == 100
        with pytest.raises(TransferError, match="more than the 99 allowed") as big:  # size cap: no retry
            t.get(url, max_bytes=99)
        assert big.value.status == 413 and calls["GET"] == 4
        with pytest.raises(TransferError, match="HTTP 403") as denied:  # a refused upload is not retried
            t.put(url, b"y" * 10)
        assert denied.value.status == 403 and calls["PUT"] == 1 and t.stats.bytes_up == 0
    finally:
        t.close()
        srv.shutdown()

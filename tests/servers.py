"""Real servers on 127.0.0.1 for tests and scripts: rclone's S3 server, the bridge (as a
`python -m bridge` process), and a LocalChain with registered keypairs.

    s3 = start_s3(tmp_path / "s3")                       # S3Server; s3.stop()
    chain, keys = make_chain(tmp_path / "chain.db", miners=4, validators=1)
    b = start_bridge(tmp_path, run_config, chain_path, s3)  # BridgeProcess; b.url, b.hotkey
    client = BridgeClient(keys["miners"][0], b.url, b.hotkey)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from scripts.local_bridge import (REPO, BridgeProcess, code_bytes, make_chain, start_bridge,
                                  start_bridges, tiny_run_config)
from scripts.local_servers import S3Server as _LauncherS3Server
from scripts.local_servers import free_port, rclone_binary, wait_http
from scripts.local_servers import start_s3 as _launcher_start_s3

__all__ = ["free_port", "S3Server", "start_s3", "BridgeProcess", "start_bridge", "start_bridges", "make_chain",
           "tiny_run_config", "code_bytes", "wait_http", "rclone_binary", "REPO", "ACCESS_KEY", "SECRET_KEY"]

ACCESS_KEY, SECRET_KEY = "testkey", "testsecret"  # fixed, so tests can build their own clients


@dataclass
class S3Server(_LauncherS3Server):
    """The launcher's rclone S3 server, plus a bridge `Storage` on it."""

    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def storage(self, bucket: Optional[str] = None) -> Any:
        """A bridge Storage on this server (bucket created)."""
        from bridge.storage import Storage
        return Storage(self.endpoint, bucket or self.bucket, self.access_key, self.secret_key)


def start_s3(root: Path) -> S3Server:
    """Start rclone's SigV4-checking S3 server on a free loopback port (test credentials)."""
    s = _launcher_start_s3(Path(root), ACCESS_KEY, SECRET_KEY)
    return S3Server(endpoint=s.endpoint, root=s.root, proc=s.proc, access_key=s.access_key,
                    secret_key=s.secret_key, bucket=s.bucket)



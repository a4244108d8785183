"""Shared pytest fixtures: real rclone S3 server and LocalChain helpers (see tests/servers.py)."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.servers import S3Server, start_s3


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """rclone serve s3 on 127.0.0.1 over a temp directory, one per test module."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module: 2 cores oversubscribed by several threads crawl."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

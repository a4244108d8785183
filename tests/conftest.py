"""Shared pytest fixtures: real rclone S3 server, a throwaway PostgreSQL cluster, and LocalChain
helpers (see tests/servers.py)."""
from __future__ import annotations

import itertools
from typing import Any, Iterator

import pytest

from tests.servers import S3Server, start_s3

_DB_NAMES = itertools.count()


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1, started once per pytest worker process
    (scripts/local_postgres.py); a test that needs it fails, never skips, when it cannot start."""
    from scripts.local_postgres import PostgresUnavailable, start_postgres
    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL cannot start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """A fresh, empty database in the session's cluster (one per test)."""
    return postgres.create_database(f"t{next(_DB_NAMES)}")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Each backend in turn: a SQLite file path, then a fresh PostgreSQL database URL."""
    if request.param == "sqlite":
        return str(tmp_path / "bridge.db")
    return request.getfixturevalue("pg_url")


def _module_cost(items: list[pytest.Item]) -> tuple[int, float]:
    """A module's declared cost: (marked slow, its largest explicit timeout), higher runs sooner."""
    slow = any(i.get_closest_marker("slow") for i in items)
    limits = [float(m.args[0]) for i in items for m in i.iter_markers("timeout") if m.args]
    return int(slow), max(limits, default=0.0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the costliest modules first (scripts/test.sh keeps this order across xdist workers with
    --no-loadscope-reorder), so the long end-to-end files do not start last and leave one worker
    idle while the other finishes them; tests keep their order within a module."""
    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    ordered = sorted(by_module.values(), key=_module_cost, reverse=True)  # stable: ties keep file order
    items[:] = [i for group in ordered for i in group]

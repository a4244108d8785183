"""A throwaway PostgreSQL cluster on 127.0.0.1 for tests and benchmarks: `initdb` into a temp
dir, `pg_ctl start` on a free port, `stop()` stops it and deletes the dir.

PostgreSQL refuses to run as root, so as root (CI) the cluster is created and run by the
`postgres` system user that Debian's package creates. The binaries come from $PG_BIN, else
`pg_config --bindir`, else Debian's /usr/lib/postgresql/<newest>/bin, else PATH.
Any failure raises `PostgresUnavailable` with one line saying why and what to do."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from scripts.local_servers import free_port

__all__ = ["PostgresServer", "PostgresUnavailable", "start_postgres", "pg_bindir",
           "fresh_database"]

INSTALL_HINT = "install it with: apt-get install -y postgresql"


class PostgresUnavailable(RuntimeError):
    """The throwaway cluster could not be started (one line: why, and what to do)."""


def pg_bindir() -> Path:
    """The folder holding initdb and pg_ctl."""
    env = os.environ.get("PG_BIN")
    if env:
        return Path(env)
    cfg = shutil.which("pg_config")
    if cfg:
        out = subprocess.run([cfg, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise PostgresUnavailable(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}")


def _as_user() -> Optional[pwd.struct_passwd]:
    """The user to run the server as: ourselves, or `postgres` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root and there is no 'postgres' user to run the "
                                  f"server as (PostgreSQL refuses root); {INSTALL_HINT}") from None


def _demote(user: Optional[pwd.struct_passwd]):
    if user is None:
        return None

    def run_as() -> None:
        os.setgid(user.pw_gid)
        os.setgroups([])
        os.setuid(user.pw_uid)
    return run_as


@dataclass
class PostgresServer:
    """A running throwaway cluster: connect with `url(dbname)`; `stop()` removes everything."""

    root: Path
    port: int
    user: str
    bindir: Path
    run_as: Optional[pwd.struct_passwd]

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for database `dbname` (trust authentication on loopback)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), *args],
                             capture_output=True, text=True, preexec_fn=_demote(self.run_as))
        if check and out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
            log = self.root / "server.log"
            more = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise PostgresUnavailable(f"pg_ctl {args[0]} failed: {tail[0]}"
                                      + (f" (server log: {more[0]})" if more else ""))
        return out

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its folder."""
        try:
            if (self.root / "data" / "postmaster.pid").exists():
                self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "30", check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(parent: Optional[Path] = None, fsync: bool = False) -> PostgresServer:
    """initdb + pg_ctl start on a free loopback port; waits until it accepts connections.
    `fsync=False` (tests) trades crash safety of the throwaway cluster for speed."""
    bindir = pg_bindir()
    for tool in ("initdb", "pg_ctl"):
        if not (bindir / tool).exists():
            raise PostgresUnavailable(f"{bindir / tool} is missing; {INSTALL_HINT}")
    user = _as_user()
    root = Path(tempfile.mkdtemp(prefix="resbm-pg-", dir=parent))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    name = user.pw_name if user is not None else pwd.getpwuid(os.geteuid()).pw_name
    server = PostgresServer(root=root, port=free_port(), user="resbm", bindir=bindir, run_as=user)
    init = subprocess.run([str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust",
                           "-U", "resbm", "-E", "UTF8", "--no-sync", "--locale=C"],
                          capture_output=True, text=True, preexec_fn=_demote(user))
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        last = (init.stderr or init.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PostgresUnavailable(f"initdb (as {name}) failed: {last[0]}")
    opts = (f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories='' "
            f"-c max_connections=200 -c fsync={'on' if fsync else 'off'} "
            "-c synchronous_commit=on -c full_page_writes=off -c shared_buffers=64MB")
    try:
        server._pg_ctl("start", "-w", "-t", "60", "-l", str(root / "server.log"), "-o", opts)
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: PostgresServer, timeout: float = 30.0) -> None:
    import psycopg
    end, last = time.monotonic() + timeout, None
    while time.monotonic() < end:
        try:
            psycopg.connect(server.url(), connect_timeout=2).close()
            return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.1)
    raise PostgresUnavailable(f"PostgreSQL on port {server.port} did not accept connections "
                              f"within {timeout:.0f} s: {str(last).strip().splitlines()[0]}")


def fresh_database(url: str, name: str) -> str:
    """Create database `name` on the server `url` points at (its user needs CREATEDB); returns
    the URL of the new database."""
    from urllib.parse import urlsplit

    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlsplit(url)._replace(path="/" + name).geturl()

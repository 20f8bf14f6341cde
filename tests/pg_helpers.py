"""A real PostgreSQL for the tests: Debian's server, a throwaway cluster in a temp folder.

``initdb`` and ``pg_ctl`` refuse to run as root (CI runs as root): there they run as
the ``postgres`` user the Debian package made. The cluster listens on 127.0.0.1 only,
on a free port, with password authentication for the role the gateway uses; each test
gets a database of its own (``pg_url``), so nothing leaks between tests. Started once per
test session, at the first test that asks for it, and stopped at the end.

Loaded as a pytest plugin by conftest.py (``pytest_plugins``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

ROLE, PASSWORD = "purlgate", "pg-test-secret"


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    pytest.fail(f"PostgreSQL's {name} is not installed (scripts/dev test installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One running cluster: ``url(db)`` for the gateway's role, ``admin()`` for set-up."""

    def __init__(self, *, durable: bool = False) -> None:
        """``durable``: fsync on, as in production (the benchmarks); the tests run
        without it, as nothing they check needs a power cut survived."""
        self.fsync = "on" if durable else "off"
        self.root = Path(tempfile.mkdtemp(prefix="purlgate-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        pwfile = self.root / "pw"
        pwfile.write_text("admin\n")
        if self._as:
            shutil.chown(pwfile, "postgres")
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "admin", "--pwfile",
                  str(pwfile), "-A", "scram-sha-256", "-E", "UTF8", "--no-sync")
        self.start()
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}' CREATEDB")

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c fsync={self.fsync}"
                   f" -c unix_socket_directories={self.root} -c max_connections=300")
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-l",
                  str(self.root / "log"), "start")

    def stop(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def admin(self, db: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host="127.0.0.1", port=self.port, user="admin",
                               password="admin", dbname=db, autocommit=True)

    def url(self, db: str) -> str:
        return f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
        return name

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The URL of a fresh, empty database of this test's own."""
    return pg_cluster.url(pg_cluster.new_database())

"""A throwaway PostgreSQL cluster on a free loopback port, in a temporary directory, for tests.

`initdb` and `pg_ctl` must be on the PATH (PostgreSQL 15 is installed on the project's machines and in CI).
PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user (runuser); otherwise as
the current user. Each test asks for a database of its own (`new_database`), so tests never see each
other's rows; fault tests stop and start the cluster itself (`stop`, `start`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

BINARIES = ("initdb", "pg_ctl", "postgres")


REQUIRE_ENV = "LORASERVE_REQUIRE_POSTGRES"  # .ci/run sets it: there, no PostgreSQL is a failure, not a skip


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def require_postgres() -> None:
    """Skip the calling test or fixture where PostgreSQL is not installed, naming what is missing; fail instead
    under REQUIRE_ENV=1 (CI, where PostgreSQL is part of the machine), so a lost install cannot pass as skips."""
    import pytest

    missing = missing_binaries()
    if not missing:
        return
    why = f"PostgreSQL is not installed here ({', '.join(missing)} not on the PATH)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why}, and {REQUIRE_ENV}=1 requires it")
    pytest.skip(f"{why}: the tests of the PostgreSQL control plane cannot run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self, prefix: str = "loraserve-pg-") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self._user = None
        if os.geteuid() == 0:
            self._user = "postgres"
            pw = pwd.getpwnam(self._user)
            os.chmod(self.root, 0o755)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
                  "--locale=C")
        # Loopback only; the socket directory is ours (not /var/run/postgresql); fsync off: a test cluster.
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = "
                    f"'{self.root}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\n")
        self.start()

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        full = ["runuser", "-u", self._user, "--", *cmd] if self._user else list(cmd)
        done = subprocess.run(full, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}\n{done.stderr}\n"
                               f"{self.log.read_text() if self.log.exists() else ''}")
        return done

    @property
    def url(self) -> str:
        """The URL of the `postgres` database (for admin statements)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_of(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def new_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def close(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def cluster_for_tests(prefix: str = "loraserve-pg-") -> Iterator[PgCluster]:
    """A cluster fixture's body (`yield from`): skipped, or failed under REQUIRE_ENV=1, without PostgreSQL
    (`require_postgres`); else a new cluster, closed when the fixture ends."""
    require_postgres()
    cluster = PgCluster(prefix=prefix)
    try:
        yield cluster
    finally:
        cluster.close()

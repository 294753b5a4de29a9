"""A private, throw-away PostgreSQL 15 server for tests that must restart or
stop the database: the shared server on 5432 serves other tests at the same
time and is never touched.

``initdb`` refuses to run as root, so when the tests run as root the server's
files belong to the ``postgres`` OS user and every server command runs as that
user (``runuser``). Authentication is ``trust``, the server listens on
127.0.0.1 on a free port, and its socket lives in its own folder.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.stack import free_port

BIN = Path(os.environ.get("MAKIMA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"


def missing() -> str:
    """Why a private server cannot be started here, or "" when it can."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (BIN / tool).exists():
            return f"PostgreSQL server binaries not found: {BIN / tool} (set MAKIMA_TEST_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root and there is no {OS_USER!r} OS user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and `runuser` is missing"
    return ""


class PrivatePostgres:
    """One server: ``url(name)`` for a database on it, ``create_database()``,
    ``restart()`` (``pg_ctl restart -m fast``: every connection is cut) and
    ``stop()``."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.logfile = root / "server.log"
        self.port = port
        self.restarts = 0

    # The server's command line options, given again on every start: pg_ctl
    # restart would reuse them anyway, but a stop + start would not.
    @property
    def options(self) -> str:
        return (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1"
            # A scratch server: durability is not under test, speed is welcome.
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )

    def url(self, name: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, *args: str, timeout: float = 60) -> str:
        command = [str(BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", OS_USER, "--", *command]
        # The server's own folder as working directory: the postgres user may
        # not be allowed into the caller's.
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{self.log_tail()}"
            )
        return done.stdout

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def init(self) -> None:
        self.sockets.mkdir()
        if os.geteuid() == 0:
            for path in (self.root, self.sockets):
                shutil.chown(path, OS_USER, OS_USER)
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"
        )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", self.options, "-w", "start")

    def restart(self) -> None:
        """Stop the server (fast: open transactions are rolled back and every
        client is disconnected) and start it again; returns once it accepts
        connections."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", self.options, "-m", "fast", "-w", "restart"
        )
        self.restarts += 1

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, prefix: str = "makima_h6e_") -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"{prefix}{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running private server; stopped and deleted on exit."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    root = Path(tempfile.mkdtemp(prefix="makima-h6e-pg-"))
    server = PrivatePostgres(root, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)

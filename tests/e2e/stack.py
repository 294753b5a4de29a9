"""A real makima server for end-to-end tests: a fresh database (a SQLite file,
or a new PostgreSQL database when DATABASE_URL points at PostgreSQL), migrated
by `manage.py`, a user with an API key and a daemon token made by
`createapikey`, and daphne serving `makima.asgi:application` on a free port;
optionally a django-q2 cluster running the orchestrator's tick, and real
`makima daemon run` processes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    base_url: str
    ws_url: str
    api_key: str
    daemon_token: str
    env: dict[str, str]
    log: Path

    processes: list[subprocess.Popen] = field(default_factory=list)

    def manage(self, *args: str) -> str:
        return manage(self.env, *args)

    def start_daemon(
        self,
        name: str,
        workdir: Path,
        *,
        agents: tuple[str, ...] = ("scripted",),
        max_tasks: int = 2,
        extra: tuple[str, ...] = (),
    ) -> subprocess.Popen:
        """A real `makima daemon run` process; its log is ``<workdir>.log``."""
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(f"{workdir}.log", "a")  # noqa: SIM115 — closed with the process
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "makima.cli",
                "daemon",
                "run",
                "--server",
                self.base_url,
                "--token",
                self.daemon_token,
                "--name",
                name,
                "--max-tasks",
                str(max_tasks),
                "--workdir",
                str(workdir),
                *(arg for agent in agents for arg in ("--agent", agent)),
                *extra,
            ],
            cwd=workdir,
            env=self.daemon_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    @property
    def daemon_env(self) -> dict[str, str]:
        """A worker machine's environment: no server settings, and this Python first on PATH."""
        env = {k: v for k, v in self.env.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    outer = os.environ.get("DATABASE_URL", "")
    if outer.startswith(("postgres://", "postgresql://")):
        import psycopg

        name = f"makima_e2e_{uuid.uuid4().hex[:10]}"
        admin = outer.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield outer.rsplit("/", 1)[0] + "/" + name
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        with tempfile.TemporaryDirectory(prefix="makima-e2e-") as folder:
            yield f"sqlite:///{folder}/makima.sqlite3"


@contextlib.contextmanager
def running_stack(*, extra_env: dict[str, str] | None = None, cluster: bool = False) -> Iterator[Stack]:
    """The server (and with ``cluster`` a django-q2 cluster running the tick
    every ``MAKIMA_TICK_SECONDS``); every process is stopped on exit, daemons
    started through :meth:`Stack.start_daemon` included."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with database_url() as db_url, tempfile.TemporaryDirectory(prefix="makima-e2e-log-") as logs:
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "MAKIMA_PUBLIC_URL": base_url,
            "DJANGO_SETTINGS_MODULE": "makima.settings",
            "DJANGO_SUPERUSER_PASSWORD": "e2e-password-not-secret",
            "MAKIMA_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        manage(env, "migrate", "--noinput")
        manage(env, "createsuperuser", "--noinput", "--username", "alice", "--email", "alice@example.com")
        api_key = manage(env, "createapikey", "alice", "--name", "e2e").strip().splitlines()[-1]
        daemon_token = manage(env, "createapikey", "alice", "--daemon", "--name", "e2e daemon").strip().splitlines()[-1]
        log = Path(logs) / "daphne.log"
        with open(log, "w") as out:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "daphne",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    # Above makima's own frame limit, so that makima answers `too_large` itself.
                    "--websocket-max-message-size",
                    str(2 * int(env.get("MAKIMA_WS_MAX_BYTES", 1024 * 1024))),
                    "--websocket-max-frame-size",
                    str(2 * int(env.get("MAKIMA_WS_MAX_BYTES", 1024 * 1024))),
                    "makima.asgi:application",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            stack = Stack(
                base_url=base_url,
                ws_url=f"ws://127.0.0.1:{port}/ws/daemon/",
                api_key=api_key,
                daemon_token=daemon_token,
                env=env,
                log=log,
            )
            stack.processes.append(server)
            try:
                _wait_until_up(base_url, server, log)
                if cluster:
                    manage(env, "setup_schedules")
                    stack.processes.append(
                        subprocess.Popen(
                            [sys.executable, "manage.py", "qcluster"],
                            cwd=ROOT,
                            env=env,
                            stdout=open(Path(logs) / "cluster.log", "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT,
                        )
                    )
                yield stack
            finally:
                for process in reversed(stack.processes):
                    if process.poll() is None:
                        process.terminate()
                for process in reversed(stack.processes):
                    try:
                        process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()


def _wait_until_up(base_url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"daphne exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(base_url + "/admin/login/", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"daphne did not come up:\n{log.read_text()}")

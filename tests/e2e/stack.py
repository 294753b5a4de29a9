"""A real makima server for end-to-end tests: a fresh database (a SQLite file,
or a new PostgreSQL database when DATABASE_URL points at PostgreSQL), migrated
by `manage.py`, a user with an API key and a daemon token made by
`createapikey`, and daphne serving `makima.asgi:application` on a free port."""

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
from dataclasses import dataclass
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

    def manage(self, *args: str) -> str:
        return manage(self.env, *args)


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
def running_stack(*, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
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
            try:
                _wait_until_up(base_url, server, log)
                yield Stack(
                    base_url=base_url,
                    ws_url=f"ws://127.0.0.1:{port}/ws/daemon/",
                    api_key=api_key,
                    daemon_token=daemon_token,
                    env=env,
                    log=log,
                )
            finally:
                server.terminate()
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()


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

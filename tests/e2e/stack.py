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
def database_url(prefix: str = "makima_e2e_") -> Iterator[str]:
    """A fresh database for one stack, dropped afterwards: on the PostgreSQL
    server of DATABASE_URL (named ``<prefix><random>``), else a SQLite file."""
    outer = os.environ.get("DATABASE_URL", "")
    if outer.startswith(("postgres://", "postgresql://")):
        import psycopg

        name = f"{prefix}{uuid.uuid4().hex[:10]}"
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


def _environment(db_url: str, public_url: str, extra_env: dict[str, str] | None) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": db_url,
        "MAKIMA_PUBLIC_URL": public_url,
        "DJANGO_SETTINGS_MODULE": "makima.settings",
        "DJANGO_SUPERUSER_PASSWORD": "e2e-password-not-secret",
        "MAKIMA_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }


def _prepare(env: dict[str, str]) -> tuple[str, str]:
    """Migrate, create alice, and return her API key and a daemon token."""
    manage(env, "migrate", "--noinput")
    manage(env, "createsuperuser", "--noinput", "--username", "alice", "--email", "alice@example.com")
    api_key = manage(env, "createapikey", "alice", "--name", "e2e").strip().splitlines()[-1]
    daemon_token = manage(env, "createapikey", "alice", "--daemon", "--name", "e2e daemon").strip().splitlines()[-1]
    return api_key, daemon_token


def _start_daphne(port: int, env: dict[str, str], log: Path, *, mode: str = "w") -> subprocess.Popen:
    with open(log, mode) as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(daphne_command(port, env), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _start_qcluster(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(processes: list[subprocess.Popen], timeout: float) -> None:
    """Terminate, newest first; kill what does not exit within ``timeout``."""
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
    for process in reversed(processes):
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_stack(
    *, extra_env: dict[str, str] | None = None, cluster: bool = False, database: str | None = None
) -> Iterator[Stack]:
    """The server (and with ``cluster`` a django-q2 cluster running the tick
    every ``MAKIMA_TICK_SECONDS``); every process is stopped on exit, daemons
    started through :meth:`Stack.start_daemon` included. ``database``: an
    empty database's URL to use instead of a fresh one (its maker drops it)."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    fresh = contextlib.nullcontext(database) if database else database_url()
    with fresh as db_url, tempfile.TemporaryDirectory(prefix="makima-e2e-log-") as logs:
        env = _environment(db_url, base_url, extra_env)
        api_key, daemon_token = _prepare(env)
        log = Path(logs) / "daphne.log"
        server = _start_daphne(port, env, log)
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
                stack.processes.append(_start_qcluster(env, Path(logs) / "cluster.log"))
            yield stack
        finally:
            _stop(stack.processes, timeout=10)


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


# --------------------------------------------------------------------------- scale-out: N daphne + M clusters


@dataclass
class Web:
    """One daphne process of a :class:`Cluster`."""

    base_url: str
    ws_url: str
    log: Path
    process: subprocess.Popen


@dataclass
class Cluster:
    """A scale-out deployment on one machine: several daphne processes
    (``web``) and several django-q2 clusters sharing one database and one
    Redis (channel layer and task broker), as docs/deploy.md describes."""

    web: list[Web]
    api_key: str
    daemon_token: str
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def manage(self, *args: str) -> str:
        return manage(self.env, *args)

    def log_tails(self, chars: int = 3000) -> str:
        """The end of every process's log, for assertion messages."""
        return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in sorted(self.logs.glob("*.log")))


def daphne_command(port: int, env: dict[str, str]) -> list[str]:
    limit = str(2 * int(env.get("MAKIMA_WS_MAX_BYTES", 1024 * 1024)))
    return [
        sys.executable,
        "-m",
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "--websocket-max-message-size",
        limit,
        "--websocket-max-frame-size",
        limit,
        "makima.asgi:application",
    ]


@contextlib.contextmanager
def running_cluster(
    *,
    web: int = 2,
    clusters: int = 2,
    database: str | None = None,
    database_prefix: str = "makima_e2e_",
    extra_env: dict[str, str] | None = None,
    schedules: bool = True,
    credentials: tuple[str, str] | None = None,
) -> Iterator[Cluster]:
    """``web`` daphne processes and ``clusters`` django-q2 clusters on one
    database and the Redis of ``REDIS_URL`` (which must be set: without it
    every process would have its own in-memory channel layer).

    ``database`` is the URL of a database to share (pytest's test database,
    so that a test reads and writes the rows the processes work on); without
    it a fresh one is created (``database_prefix`` + random) and dropped.
    ``credentials`` (an API key and a daemon token) say that the database is
    migrated and has its user already, made by a caller that has Django set up
    (starting ``manage.py`` three times takes seconds on a busy machine);
    without, they are made here as in :func:`running_stack`. With
    ``schedules`` the orchestrator's tick is scheduled (``setup_schedules``);
    without, the clusters run only what is enqueued explicitly. Every process
    is stopped on exit."""
    if not os.environ.get("REDIS_URL"):
        raise RuntimeError("running_cluster needs REDIS_URL: processes share the channel layer and broker through it")
    with contextlib.ExitStack() as resources:
        db_url = database or resources.enter_context(database_url(database_prefix))
        logs = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="makima-cluster-log-")))
        ports = [free_port() for _ in range(web)]
        # Daemons and agents are told the first web process; a proxy would be the public address.
        env = _environment(db_url, f"http://127.0.0.1:{ports[0]}", extra_env)
        api_key, daemon_token = credentials if credentials is not None else _prepare(env)
        if schedules:
            manage(env, "setup_schedules")
        cluster = Cluster(web=[], api_key=api_key, daemon_token=daemon_token, env=env, logs=logs)
        try:
            for index, port in enumerate(ports):
                log = logs / f"daphne-{index}.log"
                process = _start_daphne(port, env, log)
                cluster.processes.append(process)
                cluster.web.append(
                    Web(
                        base_url=f"http://127.0.0.1:{port}",
                        ws_url=f"ws://127.0.0.1:{port}/ws/daemon/",
                        log=log,
                        process=process,
                    )
                )
            for index in range(clusters):
                cluster.processes.append(_start_qcluster(env, logs / f"qcluster-{index}.log"))
            for one in cluster.web:
                _wait_until_up(one.base_url, one.process, one.log)
            yield cluster
        finally:
            _stop(cluster.processes, timeout=15)


# --------------------------------------------------------------------------- faults: a crashed server, a fast tick


def restart_server(stack: Stack, *, kill: bool = True) -> subprocess.Popen:
    """Stop the stack's daphne (SIGKILL by default: a crash, so no socket is
    closed cleanly and no consumer's ``disconnect`` runs) and start a new one on
    the same port, database and environment; it replaces ``stack.processes[0]``
    and appends to the same log."""
    server = stack.processes[0]
    if server.poll() is None:
        if kill:
            server.kill()
        else:
            server.terminate()
    server.wait(timeout=30)
    port = int(stack.base_url.rsplit(":", 1)[1])
    process = _start_daphne(port, stack.env, stack.log, mode="a")
    stack.processes[0] = process
    # The port may still be held for a moment by the dead process's sockets; daphne binds with SO_REUSEADDR.
    _wait_until_up(stack.base_url, process, stack.log)
    return process


def start_ticker(stack: Stack, interval: float = 1.0) -> subprocess.Popen:
    """``manage.py orchestrator_tick --loop``: the tick every ``interval`` seconds.

    django-q2 looks at its schedules only every ~30 s whatever
    ``MAKIMA_TICK_SECONDS`` says, so a test that waits for a lease to run out
    would wait that long; this runs beside the cluster (ticks are safe to run
    concurrently). Its log is ``ticker.log`` next to daphne's."""
    log = open(stack.log.with_name("ticker.log"), "a")  # noqa: SIM115 — closed with the process
    process = subprocess.Popen(
        [sys.executable, "manage.py", "orchestrator_tick", "--loop", "--interval", str(interval)],
        cwd=ROOT,
        env=stack.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack.processes.append(process)
    return process

"""Cross-process command latency in a scale-out deployment on one machine:
two daphne processes (A and B) and two django-q2 clusters on one PostgreSQL
database and one Redis (channel layer and task broker), with a
protocol-speaking test daemon connected to A.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/makima_bench REDIS_URL=redis://127.0.0.1:6379/3 \\
        .venv/bin/python bench/multiprocess_latency.py [--repeat 50] [--poll-s 1.0]

Prints p50 and p95 in milliseconds for

- *API on B → daemon on A*: from sending ``POST /directives/{id}/start/``
  to daphne B until the ``spawn_task`` arrives on A's socket, and from
  ``POST /directives/{id}/stop/`` until the ``interrupt_task`` arrives;
- *tick in a cluster → daemon on A*: a pending task that no event dispatched
  (the daemon was full; its capacity is raised in the database behind the
  server's back) is dispatched by an orchestrator tick that runs in a cluster
  worker; from the ``DaemonCommand`` row's ``created_at`` (written by the
  cluster) until the command arrives on A.

Target: within 100 ms. The command reaches A through a channel-layer
``outbox.wake`` sent over Redis by the process that queued it; A's consumer
also polls its outbox every ``MAKIMA_OUTBOX_POLL_S`` (``--poll-s``; with a
large value only the wake-up can deliver in time).

The database is a fresh one next to DATABASE_URL's (``<name>_<random>``),
dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.fake_daemon import api  # noqa: E402
from tests.e2e.stack import Cluster, database_url, running_cluster  # noqa: E402
from tests.scale import DaemonThread, Held, Receipt, RecordingDaemon, new_commands, wait_for  # noqa: E402

if TYPE_CHECKING:
    from daemons.models import DaemonCommand


def rest(cluster: Cluster, web: int, method: str, path: str, body: object = None) -> object:
    return api(cluster.web[web].base_url, method, path, cluster.api_key, body)


def new_directive(cluster: Cluster, title: str, steps: int) -> dict:
    directive = rest(
        cluster,
        1,
        "POST",
        "/api/v1/directives/",
        {"title": title, "goal": "Measure cross-process delivery.", "agent": "scripted", "evaluation_mode": "off"},
    )
    batch = [{"name": f"S{i:03d}", "task_plan": "noop", "order_index": 0} for i in range(steps)]
    rest(cluster, 1, "POST", f"/api/v1/directives/{directive['id']}/steps/batch/", {"steps": batch})
    return directive


class Figures:
    """Per path: the whole latency, and its two halves split at the moment
    daphne A claimed the command (``sent_at``, stamped in A's transaction)."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, path: str, total_ms: float, command: DaemonCommand, receipt: Receipt) -> None:
        created, sent = command.created_at.timestamp(), command.sent_at.timestamp()
        for key, ms in (
            (path, total_ms),
            (f"{path}|row", (receipt.wall - created) * 1000),
            (f"{path}|claim", (sent - created) * 1000),
            (f"{path}|send", (receipt.wall - sent) * 1000),
        ):
            self.values.setdefault(key, []).append(ms)

    def report(self, path: str, title: str, total: str) -> list[str]:
        return [
            summary(f"{title}: {total}", self.values[path]),
            summary("  command row created → received on A", self.values[f"{path}|row"]),
            summary("    row created → claimed by A (sent_at)", self.values[f"{path}|claim"]),
            summary("    claimed by A → received", self.values[f"{path}|send"]),
        ]


def api_path(cluster: Cluster, repeat: int, figures: Figures) -> None:
    """Start and stop ``repeat`` one-step directives through daphne B."""
    from contracts.models import Task
    from daemons.models import DaemonCommand

    held = Held()
    with DaemonThread(
        RecordingDaemon(ws_url=cluster.web[0].ws_url, token=cluster.daemon_token, behaviour=held, name="api-a")
    ) as thread:
        daemon = thread.daemon

        def measure(directive: dict, action: str) -> DaemonCommand:
            seen = set(daemon.commands)
            sent = time.perf_counter()
            rest(cluster, 1, "POST", f"/api/v1/directives/{directive['id']}/{action}/")
            (command_id,) = wait_for(new_commands(daemon, seen), timeout=60)
            receipt = daemon.commands[command_id]
            command = DaemonCommand.objects.get(pk=command_id)
            figures.add(action, (receipt.perf - sent) * 1000, command, receipt)
            return command

        for n in range(repeat):
            directive = new_directive(cluster, f"API {n}", 1)
            spawn = measure(directive, "start")
            assert spawn.command_type == "spawn_task", spawn.command_type
            # Stop a running task: a stop that races the daemon's task_started loses the
            # interrupt (contracts.services.task_cancel; see tests/scale/test_multiprocess.py).
            wait_for(Task.objects.filter(pk=spawn.task_id, status=Task.Status.RUNNING).exists)
            interrupt = measure(directive, "stop")
            assert interrupt.command_type == "interrupt_task", interrupt.command_type
            # The daemon keeps "running" the stopped task until it goes away: a report
            # on a cancelled task would change nothing, and is not what is measured.


def tick_path(cluster: Cluster, repeat: int, figures: Figures) -> None:
    """``repeat`` ticks, each dispatching one task that no event dispatched."""
    from django.db.models import F
    from django_q.tasks import async_task, result

    from daemons.models import Daemon, DaemonCommand

    held = Held()
    with DaemonThread(
        RecordingDaemon(
            ws_url=cluster.web[0].ws_url, token=cluster.daemon_token, behaviour=held, name="tick-a", max_tasks=1
        )
    ) as thread:
        daemon = thread.daemon
        directive = new_directive(cluster, "Ticks", repeat + 1)
        seen = set(daemon.commands)
        rest(cluster, 1, "POST", f"/api/v1/directives/{directive['id']}/start/")
        wait_for(new_commands(daemon, seen), timeout=30)  # the first step fills the daemon's only slot
        for _ in range(repeat):
            # One more slot, raised behind the server's back: no event dispatches into it, only a tick.
            Daemon.objects.filter(name="tick-a").update(max_concurrent_tasks=F("max_concurrent_tasks") + 1)
            seen = set(daemon.commands)
            enqueued = time.time()
            tick = async_task("directives.tasks.orchestrator_tick")
            (command_id,) = wait_for(new_commands(daemon, seen), timeout=60)
            receipt = daemon.commands[command_id]
            command = DaemonCommand.objects.get(pk=command_id)
            assert command.command_type == "spawn_task", command.command_type
            figures.add("tick", (receipt.wall - enqueued) * 1000, command, receipt)
            stats = result(tick, wait=30_000)
            assert stats and stats.get("dispatched") == 1, stats


def summary(name: str, values: list[float]) -> str:
    p95 = statistics.quantiles(values, n=100, method="inclusive")[94]
    return f"{name:<52} p50 {statistics.median(values):6.1f} ms  p95 {p95:6.1f} ms  max {max(values):6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50, help="repetitions of each path (default 50)")
    parser.add_argument(
        "--poll-s", type=float, default=1.0, help="MAKIMA_OUTBOX_POLL_S of the daphne processes (default 1.0)"
    )
    args = parser.parse_args()
    outer = os.environ.get("DATABASE_URL", "")
    if not outer.startswith(("postgres://", "postgresql://")) or not os.environ.get("REDIS_URL"):
        raise SystemExit("set DATABASE_URL to a PostgreSQL server and REDIS_URL: this measures PostgreSQL + Redis")
    with database_url(prefix=outer.rsplit("/", 1)[1].split("?")[0] + "_") as url:
        os.environ["DATABASE_URL"] = url
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "makima.settings")
        os.environ.setdefault("MAKIMA_LOG_LEVEL", "WARNING")
        import django

        django.setup()
        from django.db import connections

        try:
            with running_cluster(
                database=url, schedules=False, extra_env={"MAKIMA_OUTBOX_POLL_S": str(args.poll_s)}
            ) as cluster:
                figures = Figures()
                api_path(cluster, args.repeat, figures)
                tick_path(cluster, args.repeat, figures)
        finally:
            connections.close_all()
    print(
        f"2 daphne + 2 django-q2 clusters, PostgreSQL + Redis, daemon on A, MAKIMA_OUTBOX_POLL_S={args.poll_s:g}, "
        f"{args.repeat} repetitions each"
    )
    lines = [
        *figures.report("start", "API on B → daemon on A", "POST start → spawn_task"),
        *figures.report("stop", "API on B → daemon on A", "POST stop → interrupt_task"),
        *figures.report("tick", "tick in a cluster → daemon on A", "tick enqueued → spawn_task"),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()

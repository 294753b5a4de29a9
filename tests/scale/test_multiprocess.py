"""Scale-out on one machine (docs/deploy.md): two daphne processes (A and B)
and two django-q2 clusters on one PostgreSQL database and one Redis.

A daemon connected to A must receive at once the commands caused by an API
call that daphne B served and by a tick that ran in a cluster worker: the
process that queues a command wakes A's consumer through the Redis channel
layer. The daphne processes poll their outboxes only every 30 s here
(``MAKIMA_OUTBOX_POLL_S``), so a command that arrives within a second of its
row's creation was delivered by a wake-up. ``bench/multiprocess_latency.py``
measures the same paths against the 100 ms target.

The processes share pytest's test database, so that the test reads the rows
they write and sets up states no event leads to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from contracts.models import Task
from daemons.models import ApiToken, Daemon, DaemonCommand
from daemons.services import token_create
from directives.models import Directive, DirectiveEvent, Step
from tests.e2e.fake_daemon import FakeDaemon, Outcome, api
from tests.e2e.stack import Cluster, running_cluster
from tests.factories import make_daemon, make_directive, make_steps, make_user
from tests.scale import DaemonThread, Held, RecordingDaemon, daemon_thread, new_commands, wait_for

ROOT = Path(__file__).resolve().parents[2]

# What one delivery may take here, from the command row's creation in another
# process to its arrival on A. The target is 100 ms (see the bench); a second
# keeps a loaded CI machine from failing the test, and is still far below the
# 30 s outbox poll, so only a wake-up can meet it.
FAST_MS = 1000.0
# From sending the request to B to the arrival on A. This also holds B's own
# work on the request (starting a directive: readiness, a contract, a task, a
# token), which a machine busy with other test runs makes take over a second,
# so the bound is looser; it still fails when delivery waits for a poll or a tick.
REQUEST_MS = 5000.0
POLL_S = 30
LEASE_S = 2

ENV = {
    "MAKIMA_OUTBOX_POLL_S": str(POLL_S),
    # Long enough that a busy machine does not make a tick take a live daemon for lost.
    "MAKIMA_HEARTBEAT_INTERVAL_S": "5",
    "MAKIMA_TASK_LEASE_S": str(LEASE_S),
    "MAKIMA_TICK_SECONDS": "1",
    "MAKIMA_Q_WORKERS": "1",
}

multiprocess = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql" or not settings.REDIS_URL,
        reason="several daphne and django-q2 processes share state through PostgreSQL and Redis: "
        "set DATABASE_URL=postgresql://… and REDIS_URL=redis://…",
    ),
]


def scale_test(function: Callable[..., Any]) -> Callable[..., Any]:
    for mark in multiprocess:
        function = mark(function)
    return function


def _database_url() -> str:
    s = connection.settings_dict
    password = f":{s['PASSWORD']}" if s.get("PASSWORD") else ""
    return f"postgresql://{s['USER']}{password}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def _cluster(*, schedules: bool) -> Any:
    """Two daphne and two clusters on this test's database, with alice's keys made here."""
    alice = make_user("alice")
    credentials = (
        token_create(owner=alice, kind=ApiToken.Kind.USER, name="e2e").plain,
        token_create(owner=alice, kind=ApiToken.Kind.DAEMON, name="e2e daemon").plain,
    )
    return running_cluster(
        web=2, clusters=2, database=_database_url(), extra_env=ENV, schedules=schedules, credentials=credentials
    )


class Web:
    """The REST API through one daphne process."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.base_url = cluster.web[index].base_url
        self.ws_url = cluster.web[index].ws_url
        self.key = cluster.api_key

    def __call__(self, method: str, path: str, body: Any = None) -> Any:
        return api(self.base_url, method, "/api/v1" + path, self.key, body)


def delivered(daemon: RecordingDaemon, call: Callable[[], Any], *, count: int = 1) -> list[tuple[str, float, float]]:
    """Run ``call`` (a request to daphne B) and wait for ``count`` new commands
    on the daemon; each with the milliseconds from sending the request and
    from the command row's creation to its arrival."""
    seen = set(daemon.commands)
    sent = time.perf_counter()
    call()
    arrived = wait_for(new_commands(daemon, seen, count), timeout=POLL_S / 2)
    return [
        (command_id, (daemon.commands[command_id].perf - sent) * 1000, since_created(daemon, command_id))
        for command_id in arrived
    ]


def since_created(daemon: RecordingDaemon, command_id: str) -> float:
    """Milliseconds from the command row's creation (in another process) to its arrival."""
    created = DaemonCommand.objects.get(pk=command_id).created_at.timestamp()
    return (daemon.commands[command_id].wall - created) * 1000


def enqueue_tick() -> str:
    """Run the orchestrator's tick in whichever cluster worker takes it from the Redis broker."""
    from django_q.tasks import async_task

    return async_task("directives.tasks.orchestrator_tick")


def tick_result(task_id: str) -> dict[str, Any]:
    from django_q.tasks import result

    stats = result(task_id, wait=30_000)
    assert stats is not None, "the tick did not run in a cluster"
    return stats


def state(directive_id: str) -> str:
    """The rows a failed wait is about, for its message."""
    lines = [f"directive {Directive.objects.get(pk=directive_id).status}"]
    for task in Task.objects.filter(directive_id=directive_id).select_related("daemon", "step").order_by("created_at"):
        daemon = task.daemon.name if task.daemon else None
        lines.append(f"task {task.kind} {getattr(task.step, 'name', None)} #{task.attempt} {task.status} on {daemon}")
    for daemon in Daemon.objects.order_by("name"):
        lines.append(
            f"daemon {daemon.name} {daemon.status} max {daemon.max_concurrent_tasks} seen {daemon.last_seen_at}"
        )
    for command in DaemonCommand.objects.select_related("daemon").order_by("created_at"):
        lines.append(f"command {command.command_type} → {command.daemon.name} {command.status} {command.created_at}")
    return "\n".join(lines)


def new_directive(web: Web, title: str, steps: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    directive = web(
        "POST",
        "/directives/",
        {"title": title, "goal": "Spread the work over processes.", "agent": "scripted", "evaluation_mode": "off"}
        | fields,
    )
    web("POST", f"/directives/{directive['id']}/steps/batch/", {"steps": steps})
    return directive


def task_of(directive_id: str, step_name: str, **filters: Any) -> Task | None:
    return (
        Task.objects.filter(directive_id=directive_id, step__name=step_name, kind=Task.Kind.EXECUTION, **filters)
        .order_by("-created_at")
        .first()
    )


def assert_each_task_dispatched_once_per_attempt(directive_id: str, daemons: list[FakeDaemon]) -> None:
    """One ``spawn_task`` row and one ``task_starting`` event per task and
    attempt, every command acknowledged, and no daemon got a command twice."""
    tasks = list(Task.objects.filter(directive_id=directive_id))
    assert tasks
    spawns = Counter(
        DaemonCommand.objects.filter(task__in=tasks, command_type="spawn_task").values_list("task_id", flat=True)
    )
    startings = Counter(
        DirectiveEvent.objects.filter(directive_id=directive_id, event_type="task_starting").values_list(
            "subject_id", flat=True
        )
    )
    for task in tasks:
        if task.status == Task.Status.CANCELLED and task.daemon_id is None:
            continue  # cancelled before any daemon had it
        assert spawns[task.pk] == task.attempt, (task.name, task.attempt, spawns[task.pk])
        assert startings[str(task.pk)] == task.attempt, (task.name, task.attempt, startings[str(task.pk)])
    unacked = DaemonCommand.objects.filter(task__in=tasks).exclude(status=DaemonCommand.Status.ACKED)
    assert not unacked.exists(), list(unacked.values_list("command_type", "status"))
    for daemon in daemons:
        per_task = Counter(task["id"] for _, task in daemon.spawn_times)
        assert max(per_task.values(), default=1) == 1, per_task
        assert not daemon.errors, daemon.errors


# --------------------------------------------------------------------------- (a) API on B → daemon on A


@scale_test
def test_commands_caused_by_api_calls_on_daphne_b_reach_the_daemon_on_daphne_a_at_once():
    with _cluster(schedules=False) as cluster:
        a, b = Web(cluster, 0), Web(cluster, 1)
        held = Held()
        with daemon_thread(ws_url=a.ws_url, token=cluster.daemon_token, behaviour=held, name="daemon-a") as daemon:
            directive = new_directive(
                b, "Two steps", [{"name": "S1", "task_plan": "one"}, {"name": "S2", "task_plan": "two"}]
            )
            # Per path: (ms from sending the request, ms from the command row's creation) per command.
            latencies: dict[str, list[tuple[float, float]]] = {}

            started = delivered(daemon, lambda: b("POST", f"/directives/{directive['id']}/start/"), count=2)
            latencies["start → spawn_task"] = [(ms, row) for _, ms, row in started]
            commands = DaemonCommand.objects.select_related("task__step").filter(pk__in=[c for c, _, _ in started])
            first = {command.task.step.name: command for command in commands}
            assert sorted(first) == ["S1", "S2"]
            assert {c.command_type for c in first.values()} == {"spawn_task"}

            # S1 fails while S2 still runs, so the directive stays active and a retry dispatches at once.
            held.finish(str(first["S1"].task_id), Outcome(status="failed", exit_code=1, error="it broke"))
            wait_for(lambda: Step.objects.filter(name="S1", status=Step.Status.FAILED).exists())
            s1 = Step.objects.get(name="S1")
            retried = delivered(daemon, lambda: b("POST", f"/directives/{directive['id']}/steps/{s1.pk}/retry/"))
            latencies["retry → spawn_task"] = [(ms, row) for _, ms, row in retried]
            retry_command = DaemonCommand.objects.get(pk=retried[0][0])
            assert (retry_command.command_type, retry_command.task.step_id) == ("spawn_task", s1.pk)
            assert retry_command.task_id != first["S1"].task_id

            # Stop once both tasks run (test_a_stop_that_races_… below: a stop racing task_started).
            wait_for(lambda: Task.objects.filter(status=Task.Status.RUNNING).count() == 2)
            stopped = delivered(daemon, lambda: b("POST", f"/directives/{directive['id']}/stop/"), count=2)
            latencies["stop → interrupt_task"] = [(ms, row) for _, ms, row in stopped]
            interrupts = DaemonCommand.objects.filter(pk__in=[command_id for command_id, _, _ in stopped])
            assert {c.command_type for c in interrupts} == {"interrupt_task"}
            assert {c.task_id for c in interrupts} == {retry_command.task_id, first["S2"].task_id}
            wait_for(lambda: not DaemonCommand.objects.exclude(status=DaemonCommand.Status.ACKED).exists())

        slow = {
            path: (ms, row)
            for path, values in latencies.items()
            for ms, row in values
            if ms >= REQUEST_MS or row >= FAST_MS
        }
        assert not slow, f"deliveries too slow: {slow}; all: {latencies}\n{cluster.log_tails()}"

        # Nothing lost or doubled: S1 ran twice (a retry is a new task), S2 once; both interrupted once.
        assert Directive.objects.get(pk=directive["id"]).status == Directive.Status.FAILED
        tasks = Counter(Task.objects.filter(directive_id=directive["id"]).values_list("step__name", "status"))
        assert tasks == Counter({("S1", "failed"): 1, ("S1", "cancelled"): 1, ("S2", "cancelled"): 1})
        per_task = Counter(
            DaemonCommand.objects.filter(task__directive_id=directive["id"]).values_list(
                "task__step__name", "command_type"
            )
        )
        assert per_task == Counter(
            {("S1", "spawn_task"): 2, ("S2", "spawn_task"): 1, ("S1", "interrupt_task"): 1, ("S2", "interrupt_task"): 1}
        )
        assert_each_task_dispatched_once_per_attempt(directive["id"], [daemon])


# --------------------------------------------------------------------------- (b) tick in a cluster → daemon on A


@scale_test
def test_commands_caused_by_ticks_in_a_cluster_process_reach_the_daemon_on_daphne_a_at_once():
    with _cluster(schedules=False) as cluster:
        a, b = Web(cluster, 0), Web(cluster, 1)
        held = Held()
        with daemon_thread(
            ws_url=a.ws_url, token=cluster.daemon_token, behaviour=held, name="daemon-a", max_tasks=1
        ) as daemon:
            directive = new_directive(
                b,
                "Ticks",
                [{"name": "S1", "task_plan": "one"}, {"name": "S2", "task_plan": "two"}],
                repository_url="/srv/repos/ticks.git",
            )
            delivered(daemon, lambda: b("POST", f"/directives/{directive['id']}/start/"))  # S1 fills the one slot
            wait_for(lambda: task_of(directive["id"], "S2", status=Task.Status.PENDING))
            latencies: dict[str, float] = {}

            # A pending task that no event dispatched: the daemon's capacity is
            # raised in the database behind the server's back, so only a tick finds it.
            Daemon.objects.filter(name="daemon-a").update(max_concurrent_tasks=2)
            seen = set(daemon.commands)
            stats = tick_result(enqueue_tick())
            assert stats["dispatched"] == 1, f"{stats}\n{state(directive['id'])}"
            (command_id,) = wait_for(
                new_commands(daemon, seen), timeout=POLL_S / 2, message=lambda: f"{stats}\n{state(directive['id'])}"
            )
            latencies["tick dispatches a pending task"] = since_created(daemon, command_id)
            command = DaemonCommand.objects.get(pk=command_id)
            assert (command.command_type, command.task.step.name) == ("spawn_task", "S2")

            # A daemon on daphne B takes S3 and is lost; once the lease has run out a
            # tick interrupts its task, and the retry goes to the daemon on A.
            lost = DaemonThread(
                RecordingDaemon(ws_url=b.ws_url, token=cluster.daemon_token, behaviour=Held(), name="daemon-x")
            ).start()
            seen_x = set(lost.daemon.commands)
            b("POST", f"/directives/{directive['id']}/steps/", {"name": "S3", "task_plan": "three", "order_index": 0})
            # Adding a step to an active directive does not advance it (steps_add), so a tick dispatches S3.
            enqueue_tick()
            wait_for(new_commands(lost.daemon, seen_x), timeout=POLL_S / 2)
            lost.stop()
            wait_for(lambda: Daemon.objects.filter(name="daemon-x", status=Daemon.Status.DISCONNECTED).exists())
            Daemon.objects.filter(name="daemon-a").update(max_concurrent_tasks=3)
            time.sleep(LEASE_S + 0.5)  # the lease is wall-clock time in another process
            seen = set(daemon.commands)
            stats = tick_result(enqueue_tick())
            assert stats["interrupted"] == 1, f"{stats}\n{state(directive['id'])}"
            (command_id,) = wait_for(
                new_commands(daemon, seen), timeout=POLL_S / 2, message=lambda: f"{stats}\n{state(directive['id'])}"
            )
            latencies["tick retries a task whose lease expired"] = since_created(daemon, command_id)
            command = DaemonCommand.objects.select_related("task__step").get(pk=command_id)
            assert (command.command_type, command.task.step.name, command.task.attempt) == ("spawn_task", "S3", 2)

            held.release()
            wait_for(lambda: Directive.objects.get(pk=directive["id"]).status == Directive.Status.COMPLETED)

        slow = {path: ms for path, ms in latencies.items() if ms >= FAST_MS}
        assert not slow, f"deliveries slower than {FAST_MS:g} ms: {slow}; all: {latencies}\n{cluster.log_tails()}"

    executions = Counter(
        Task.objects.filter(directive_id=directive["id"]).values_list("kind", "step__name", "attempt", "status")
    )
    assert executions == Counter(
        {
            ("execution", "S1", 1, "done"): 1,
            ("execution", "S2", 1, "done"): 1,
            ("execution", "S3", 2, "done"): 1,  # one task, run on daemon-x and then on daemon-a
            ("completion", None, 1, "done"): 1,
        }
    )
    assert_each_task_dispatched_once_per_attempt(directive["id"], [daemon, lost.daemon])
    assert lost.daemon.spawn_times[0][1]["id"] == str(command.task_id)


# --------------------------------------------------------------------------- (c) a whole directive


DIAMOND = [
    {"name": "A", "task_plan": "Lay the ground.", "order_index": 0},
    {"name": "B", "task_plan": "Write the parser.", "depends_on": ["A"], "order_index": 1},
    {"name": "C", "task_plan": "Write the printer.", "depends_on": ["A"], "order_index": 1},
    {"name": "D", "task_plan": "Wire them up.", "depends_on": ["B", "C"], "order_index": 2},
]


class Diamond:
    """Execution tasks work a little; evaluations are green except B's first (red: one rework)."""

    def __init__(self, directive_id: str) -> None:
        self.directive_id = directive_id
        self.evaluations: Counter[str] = Counter()
        self.lock = threading.Lock()

    async def __call__(self, daemon: FakeDaemon, task: dict[str, Any]) -> Outcome:
        call = daemon.api_for(task)
        env = task["env"]
        if task["kind"] == "execution":
            await asyncio.sleep(0.2)
        elif task["kind"] == "monitoring":
            step = await call("GET", f"/api/v1/directives/{self.directive_id}/steps/{env['MAKIMA_STEP_ID']}/")
            with self.lock:
                self.evaluations[step["name"]] += 1
                red = step["name"] == "B" and self.evaluations["B"] == 1
            score, level = (0.3, "red") if red else (0.95, "green")
            result = {
                "passed": not red,
                "overallScore": score,
                "confidenceLevel": level,
                "criteriaResults": [{"criterion": "AC1", "passed": not red, "score": score, "evidence": "read it"}],
                "summaryFeedback": f"scored {score}",
                "reworkInstructions": "Handle the empty input." if red else "",
            }
            await call(
                "POST",
                f"/api/v1/contracts/{env['MAKIMA_CONTRACT_ID']}/files/",
                {"name": "evaluation-result", "content": json.dumps(result)},
            )
        await call("POST", f"/api/v1/tasks/{task['id']}/complete/")
        return Outcome(summary=f"{task['kind']} {task['name']} finished")


class TickStorm:
    """Enqueues an orchestrator tick every ``interval`` seconds, so that ticks
    in both clusters run while both daphne processes handle the daemons' reports."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.enqueued: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tick storm", daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.enqueued.append(enqueue_tick())

    def __enter__(self) -> TickStorm:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


@scale_test
def test_a_directive_completes_over_two_daphnes_and_two_clusters_with_nothing_dispatched_twice():
    from django_q.models import Failure, Success

    with _cluster(schedules=True) as cluster:
        a, b = Web(cluster, 0), Web(cluster, 1)
        directive = new_directive(
            a,
            "Diamond",
            DIAMOND,
            evaluation_mode="agent",
            autonomy_level="full_auto",
            acceptance_criteria=["It round-trips"],
            repository_url="/srv/repos/diamond.git",
        )
        scenario = Diamond(directive["id"])
        common = {"token": cluster.daemon_token, "behaviour": scenario, "max_tasks": 2}
        with (
            daemon_thread(ws_url=a.ws_url, name="daemon-a", **common) as on_a,
            daemon_thread(ws_url=b.ws_url, name="daemon-b", **common) as on_b,
            TickStorm() as storm,
        ):
            b("POST", f"/directives/{directive['id']}/start/")
            try:
                wait_for(
                    lambda: Directive.objects.get(pk=directive["id"]).status == Directive.Status.COMPLETED,
                    timeout=90,
                    interval=0.1,
                )
            except AssertionError:
                raise AssertionError(
                    f"{Directive.objects.get(pk=directive['id']).status}\n{cluster.log_tails()}"
                ) from None
        # Let the ticks still queued run before the clusters stop: none may fail.
        ticks = Success.objects.filter(func="directives.tasks.orchestrator_tick")
        wait_for(lambda: ticks.count() >= len(storm.enqueued), timeout=60, interval=0.2)
        assert not Failure.objects.exists(), list(Failure.objects.values_list("func", "result"))
        completed = DirectiveEvent.objects.get(directive_id=directive["id"], event_type="directive_completed")
        assert ticks.filter(started__lt=completed.created_at).count() >= 4, "ticks ran while the directive did"

    tasks = Counter(Task.objects.filter(directive_id=directive["id"]).values_list("kind", "step__name", "status"))
    assert tasks == Counter(
        {
            ("execution", "A", "done"): 1,
            ("execution", "B", "done"): 2,  # the red evaluation sent B back once
            ("execution", "C", "done"): 1,
            ("execution", "D", "done"): 1,
            ("monitoring", "A", "done"): 1,
            ("monitoring", "B", "done"): 2,
            ("monitoring", "C", "done"): 1,
            ("monitoring", "D", "done"): 1,
            ("completion", None, "done"): 1,
        }
    )
    assert not Task.objects.filter(directive_id=directive["id"], attempt__gt=1).exists()
    assert_each_task_dispatched_once_per_attempt(directive["id"], [on_a, on_b])
    assert on_a.runs and on_b.runs, "both daemons, one on each daphne, got work"
    assert scenario.evaluations == Counter({"A": 1, "B": 2, "C": 1, "D": 1})
    transitions = Counter(
        DirectiveEvent.objects.filter(directive_id=directive["id"], subject_type="directive").values_list(
            "event_type", flat=True
        )
    )
    assert transitions["directive_completing"] == 1
    assert transitions["directive_completed"] == 1
    steps = Step.objects.filter(directive_id=directive["id"])
    assert {s.name: s.status for s in steps} == dict.fromkeys("ABCD", Step.Status.PASSED)


# --------------------------------------------------------------------------- found while measuring


@pytest.mark.django_db
def test_a_stop_that_races_the_daemons_task_started_still_cancels_and_interrupts_the_task():
    """``POST /stop/`` on daphne B reads the directive's unfinished tasks; before
    it cancels them, daphne A stores the daemon's ``task_started``. Seen in
    ``bench/multiprocess_latency.py``: the directive failed, its task ran on."""
    from contracts.services import task_cancel, task_report_started
    from directives import lifecycle
    from directives.services import directive_start
    from makima.state import SYSTEM

    alice = make_user("alice")
    daemon = make_daemon(alice, status=Daemon.Status.CONNECTED, max_concurrent_tasks=1)
    directive = make_directive(alice, agent="scripted", evaluation_mode="off")
    make_steps(directive, {"name": "S1"})
    directive_start(directive=directive, actor=SYSTEM)
    lifecycle.advance(directive_ids=[directive.pk])
    task = Task.objects.get(directive=directive, status=Task.Status.STARTING, daemon=daemon)

    what_the_stop_read = list(Task.objects.filter(directive=directive).exclude(status__in=Task.FINISHED))
    task_report_started(daemon=daemon, task_id=task.pk)  # daphne A, meanwhile
    task_cancel(tasks=what_the_stop_read, actor=SYSTEM, reason="directive stopped")

    task.refresh_from_db()
    assert task.status == Task.Status.CANCELLED
    assert DaemonCommand.objects.filter(task=task, command_type="interrupt_task").count() == 1


@pytest.mark.django_db(transaction=True)
async def test_a_daemon_a_tick_took_for_lost_gets_the_waiting_work_as_soon_as_its_heartbeat_arrives():
    """Under load a daemon's heartbeats can lag: a tick in a cluster marks it
    disconnected, a task that becomes pending meanwhile finds no daemon, and
    the next heartbeat (on the daphne holding the socket) shows it alive.
    The task must go to it then, not at the next tick (30 s later or more)."""
    from channels.db import database_sync_to_async as db
    from channels.testing import WebsocketCommunicator
    from django.db import connections
    from django.utils import timezone

    from directives import lifecycle
    from directives.services import directive_start
    from makima.asgi import application
    from makima.state import SYSTEM

    def prepare() -> str:
        alice = make_user("alice")
        return token_create(owner=alice, kind=ApiToken.Kind.DAEMON, name="box").plain

    token = await db(prepare)()
    socket = WebsocketCommunicator(application, "/ws/daemon/", headers=[(b"authorization", f"Bearer {token}".encode())])
    assert (await socket.connect())[0]
    try:
        await socket.send_json_to(
            {
                "type": "hello",
                "protocol": 1,
                "name": "box",
                "hostname": "box",
                "version": "0.1.0",
                "max_concurrent_tasks": 2,
                "agents": ["scripted"],
                "running_tasks": [],
            }
        )
        assert (await socket.receive_json_from(timeout=5))["type"] == "welcome"

        def lose_and_queue() -> None:
            # The tick (as a cluster runs it) finds the daemon silent for three heartbeat intervals.
            later = timezone.now() + timedelta(seconds=3 * settings.MAKIMA_HEARTBEAT_INTERVAL_S + 1)
            assert lifecycle.reconcile(now=later)["daemons_lost"] == 1
            directive = make_directive(Daemon.objects.get().owner, agent="scripted", evaluation_mode="off")
            make_steps(directive, {"name": "S1"})
            directive_start(directive=directive, actor=SYSTEM)
            lifecycle.advance(directive_ids=[directive.pk])
            assert Task.objects.get().status == Task.Status.PENDING  # no connected daemon

        await db(lose_and_queue)()
        await socket.send_json_to({"type": "heartbeat", "running_tasks": []})
        message = await socket.receive_json_from(timeout=5)
        assert message["type"] == "spawn_task"
        assert (await db(lambda: Daemon.objects.get().status)()) == Daemon.Status.CONNECTED
    finally:
        with contextlib.suppress(asyncio.CancelledError):  # after a failed receive the app is already gone
            await socket.disconnect()
        await db(connections.close_all)()


# --------------------------------------------------------------------------- the deployment guide


DEPLOY_ENV = ROOT / "deploy" / "makima.env"
GUIDE = ROOT / "docs" / "deploy.md"


def _settings_variables() -> set[str]:
    """Every environment variable makima/settings.py reads through the env helpers."""
    source = (ROOT / "makima" / "settings.py").read_text()
    return set(re.findall(r"\benv_(?:str|bool|int|float|list|url)\(\s*\"([A-Z0-9_]+)\"", source))


def test_the_deployment_guide_lists_every_setting_read_from_the_environment():
    variables = _settings_variables()
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "MAKIMA_OUTBOX_POLL_S"} <= variables  # the pattern works
    table = {match for match in re.findall(r"^\| `([A-Z0-9_]+)` \|", GUIDE.read_text(), flags=re.MULTILINE)}
    assert variables - table == set(), "add these to the environment table in docs/deploy.md"
    assert table - variables == set(), "docs/deploy.md lists variables settings.py does not read"


def test_the_documented_production_environment_passes_the_deploy_checks(tmp_path):
    """deploy/makima.env, as the guide tells to fill it in, is clean under
    ``check --deploy`` (tests/test_settings.py checks the bare minimum)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DJANGO_SETTINGS_MODULE": "makima.settings"}
    for line in DEPLOY_ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    assert env["DEBUG"] == "0"
    # The secret lives in a file of its own (SECRET_KEY_FILE), made at install time.
    secret = tmp_path / "secret_key"
    secret.write_text(secrets.token_urlsafe(64) + "\n")
    env["SECRET_KEY_FILE"] = str(secret)
    env["MAKIMA_STATIC_ROOT"] = str(tmp_path / "static")
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout

"""Two ticks and the event handlers race over many directives, with real
threads on PostgreSQL, until more than a thousand step attempts have finished:
no task is dispatched twice, no step attempt gets two tasks, no directive gets
a second completion task.

Every part runs the production code path in its own thread and database
connection: two threads run ``tick()`` back to back; one thread per daemon
plays its websocket connection (``command_claim`` → ``command_ack`` →
``task_report_started``, heartbeats); finisher threads play the daemon's
reports as the gateway handles them (``task_report_finished`` then
``task_finished_consequences``, which applies the consequences and dispatches
at once), sometimes twice at the same time (a daemon re-sending its report
after a reconnect); one thread calls ``advance(directive_ids=…)`` as API
actions do; and the directives are started while all of that already runs.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connection

from contracts.models import Contract, Task
from contracts.services import (
    contract_file_create,
    task_finished_consequences,
    task_report_finished,
    task_report_started,
)
from daemons.models import Daemon, DaemonCommand
from daemons.services import command_ack, command_claim, daemon_heartbeat, daemon_hello
from directives import lifecycle
from directives.models import Directive, DirectiveEvent, Step
from directives.services import StepSpec, directive_create, directive_start, steps_add
from makima.state import SYSTEM
from tests.factories import make_user

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="real concurrent transactions need PostgreSQL"),
]

OWNERS = 5
DIRECTIVES_PER_OWNER = 10
DIRECTIVES = OWNERS * DIRECTIVES_PER_OWNER
LAYERS = 10  # each layer: two steps that both depend on both steps of the layer before
STEPS = 2 * LAYERS  # 50 × 20 = 1,000 steps, each finishing at least once
# One daemon per owner with 6 slots for up to 20 ready steps: dispatch competes for capacity.
CAPACITY = 6
FINISHERS = 4
DUPLICATE_REPORT_EVERY = 7  # every 7th report is sent twice, concurrently
TIMEOUT_S = 300


def _dag() -> list[StepSpec]:
    specs = []
    for layer in range(LAYERS):
        before = [f"L{layer - 1}a", f"L{layer - 1}b"] if layer else []
        for side in "ab":
            specs.append(StepSpec(name=f"L{layer}{side}", task_plan="Do it.", depends_on=before))
    return specs


def _fails_first(step_name: str, directive_index: int) -> bool:
    """About one step in twelve is sent back once (its verifiers fail, or a red evaluation)."""
    return (zlib.crc32(step_name.encode()) + directive_index) % 12 == 0


@dataclass
class Race:
    daemons: list[tuple[Daemon, str]]
    index_of: dict[Any, int]  # directive id → its index
    work: queue.Queue = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    delivered: Counter = field(default_factory=Counter)  # task id → spawn_task messages received
    stored_reports: Counter = field(default_factory=Counter)  # task id → reports that stored the end
    reports: int = 0
    duplicate_reports: int = 0
    ticks: int = 0
    advances: int = 0
    running: dict[Any, set[str]] = field(default_factory=dict)  # daemon id → task ids

    def fail(self, where: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{where}: {type(exc).__name__}: {exc}")
        self.stop.set()


def _loop(race: Race, where: str, body: Any) -> None:
    try:
        while not race.stop.is_set():
            body()
    except BaseException as exc:  # reported by the test
        race.fail(where, exc)
    finally:
        connection.close()


def _ticker(race: Race) -> None:
    lifecycle.tick()
    with race.lock:
        race.ticks += 1
    # A short, random pause: the two ticks drift against each other and the
    # handlers, and leave the handlers some of the interpreter.
    time.sleep(random.uniform(0.1, 0.5))


def _advancer(race: Race, ids: list[Any]) -> None:
    lifecycle.advance(directive_ids=random.sample(ids, 5))
    with race.lock:
        race.advances += 1
    time.sleep(0.2)


def _daemon_connection(race: Race, daemon: Daemon, connection_id: str) -> None:
    """What the gateway does for one daemon socket: deliver the outbox, and
    what the daemon does on receipt: acknowledge and start the task."""
    last_beat = 0.0
    while not race.stop.is_set():
        if time.monotonic() - last_beat > 1:
            daemon_heartbeat(daemon=daemon, connection_id=connection_id, running_tasks=sorted(race.running[daemon.pk]))
            last_beat = time.monotonic()
        delivery = command_claim(daemon_id=daemon.pk, connection_id=connection_id)
        if not delivery.messages:
            # The gateway is woken through the channel layer; polling stands in for that.
            time.sleep(0.1)
            continue
        for message in delivery.messages:
            command_ack(daemon=daemon, command_id=message["command_id"], ok=True)
            if message["type"] != "spawn_task":
                continue
            task = message["task"]
            with race.lock:
                race.delivered[task["id"]] += 1
                race.running[daemon.pk].add(task["id"])
                twice = sum(race.delivered.values()) % DUPLICATE_REPORT_EVERY == 0
                race.duplicate_reports += twice
            task_report_started(daemon=daemon, task_id=task["id"], branch=task["branch"], base_commit="0" * 40)
            race.work.put((daemon, task))
            if twice:
                race.work.put((daemon, task))  # the same report again, from another thread


def _finisher(race: Race) -> None:
    try:
        daemon, task = race.work.get(timeout=0.1)
    except queue.Empty:
        return
    kind = task["kind"]
    step_id = task["env"]["MAKIMA_STEP_ID"]
    directive_index = race.index_of.get(task["env"]["MAKIMA_DIRECTIVE_ID"], 0)
    verifier_results: list[dict[str, Any]] = []
    if kind in ("execution", "monitoring"):
        step = Step.objects.only("name", "rework_count").get(pk=step_id)
        bad = step.rework_count == 0 and _fails_first(step.name, directive_index)
        if kind == "execution":
            verifier_results = [
                {"name": "pytest", "command": "pytest -q", "passed": not bad, "exit_code": int(bad), "duration_s": 0.1}
            ]
        else:
            result = {
                "passed": not bad,
                "overallScore": 0.2 if bad else 0.95,
                "confidenceLevel": "red" if bad else "green",
                "summaryFeedback": "scored",
                "reworkInstructions": "Do better." if bad else "",
            }
            contract = Contract.objects.get(pk=task["env"]["MAKIMA_CONTRACT_ID"])
            contract_file_create(contract=contract, name="evaluation-result", content=json.dumps(result))
    stored = task_report_finished(
        daemon=daemon,
        task_id=task["id"],
        status="done",
        exit_code=0,
        summary=f"{kind} done",
        branch=task["branch"],
        commit_sha="c" * 40,
        cost_usd=0.01,
        verifier_results=verifier_results,
    )
    with race.lock:
        race.reports += 1
        race.running[daemon.pk].discard(task["id"])
        if stored:
            race.stored_reports[task["id"]] += 1
    if stored:
        # As the gateway does once the report is committed.
        task_finished_consequences(task_id=task["id"], owner_id=daemon.owner_id)


def _stuck_report(ids: list[Any], race: Race) -> str:
    """What the unfinished directives wait for, for the assertion message."""
    lines = [f"elapsed; ticks {race.ticks}, reports {race.reports}, queue {race.work.qsize()}"]
    for directive in Directive.objects.filter(pk__in=ids).exclude(status=Directive.Status.COMPLETED)[:5]:
        steps = Counter(Step.objects.filter(directive=directive).values_list("status", flat=True))
        tasks = Counter(Task.objects.filter(directive=directive).values_list("kind", "status", "daemon__status"))
        lines.append(
            f"{directive.title} {directive.status} owner={directive.owner_id}: steps {dict(steps)} tasks {dict(tasks)}"
        )
    lines.append(str(list(Daemon.objects.values_list("owner_id", "status", "last_seen_at"))))
    lines.append(str(Counter(DaemonCommand.objects.values_list("status", flat=True))))
    return "\n".join(lines)


def test_two_ticks_and_the_event_handlers_racing_over_a_thousand_step_attempts_dispatch_nothing_twice(caplog, settings):
    # Every event is pushed to its directive's live-feed group after commit. No
    # page listens here, and with REDIS_URL those ~10,000 pushes cost a sixth of
    # the run: the in-memory layer (the embedded default) takes them instead.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # Several owners, each with a daemon: dispatch serialises on an owner's
    # daemon rows, so a handler waits only for those of its own owner (and the tick).
    owners = [make_user(f"owner-{n}") for n in range(OWNERS)]
    daemons = []
    for owner in owners:
        hello = daemon_hello(
            owner=owner, name="box", max_concurrent_tasks=CAPACITY, agents=["scripted"], running_tasks=[]
        )
        daemons.append((hello.daemon, hello.connection_id))
    directives = []
    for i in range(DIRECTIVES):
        directive = directive_create(
            owner=owners[i % OWNERS],
            title=f"Race {i}",
            goal="Race.",
            repository_url="/srv/repos/race.git",
            agent="scripted",
            # Most are judged by their verifiers alone, one in ten by an evaluator task too.
            evaluation_mode="both" if (i // OWNERS) % 10 == 0 else "verifiers",
            autonomy_level="full_auto",
        )
        steps_add(directive=directive, specs=_dag(), actor=SYSTEM)
        directives.append(directive)
    ids = [d.pk for d in directives]
    race = Race(daemons=daemons, index_of={str(d.pk): i for i, d in enumerate(directives)})
    race.running = {d.pk: set() for d, _ in daemons}

    threads = [threading.Thread(target=_loop, args=(race, f"tick {n}", lambda: _ticker(race))) for n in range(2)]
    threads.append(threading.Thread(target=_loop, args=(race, "advance", lambda: _advancer(race, ids))))
    threads += [
        threading.Thread(target=_loop, args=(race, f"finisher {n}", lambda: _finisher(race))) for n in range(FINISHERS)
    ]
    threads += [
        threading.Thread(target=_loop, args=(race, f"daemon {n}", lambda d=d, c=c: _daemon_connection(race, d, c)))
        for n, (d, c) in enumerate(daemons)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        # Users start their directives while ticks and handlers already run.
        for directive in directives:
            directive_start(directive=Directive.objects.get(pk=directive.pk), actor=SYSTEM)
        deadline = started + TIMEOUT_S
        while not race.stop.is_set() and time.monotonic() < deadline:
            if Directive.objects.filter(pk__in=ids, status=Directive.Status.COMPLETED).count() == DIRECTIVES:
                break
            time.sleep(0.5)
    finally:
        race.stop.set()
        for thread in threads:
            thread.join(timeout=60)
    elapsed = time.monotonic() - started
    assert not race.errors, race.errors
    # The gateway's handlers log (rather than raise) what failed, for the tick to
    # retry: a deadlock or any other error under the race would only show here.
    logged = [f"{r.name}: {r.getMessage()}\n{r.exc_text or ''}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not logged, logged[:3]

    # No task was dispatched twice: one move to `starting`, one spawn_task, one
    # delivery and one stored report per task (every task runs once here).
    tasks = list(Task.objects.filter(directive_id__in=ids).values("id", "kind", "status", "attempt"))
    starting = Counter(
        DirectiveEvent.objects.filter(directive_id__in=ids, event_type="task_starting").values_list(
            "subject_id", flat=True
        )
    )
    spawns = Counter(
        DaemonCommand.objects.filter(command_type="spawn_task", task__directive_id__in=ids).values_list(
            "task_id", flat=True
        )
    )
    double_dispatches = {
        "task_starting events": sum(1 for t in tasks if starting[str(t["id"])] > 1),
        "spawn_task commands": sum(1 for t in tasks if spawns[t["id"]] > 1),
        "deliveries": sum(1 for t in tasks if race.delivered[str(t["id"])] > 1),
        "stored reports": sum(1 for t in tasks if race.stored_reports[str(t["id"])] > 1),
    }
    # …and no step attempt got two tasks, no directive two completion tasks.
    steps = list(Step.objects.filter(directive_id__in=ids).values("id", "status", "rework_count"))
    executions = Counter(
        t["step_id"] for t in Task.objects.filter(directive_id__in=ids, kind=Task.Kind.EXECUTION).values("step_id")
    )
    evaluated = set(
        Step.objects.filter(directive__in=ids, directive__evaluation_mode="both").values_list("id", flat=True)
    )
    monitoring = Counter(
        Task.objects.filter(directive_id__in=ids, kind=Task.Kind.MONITORING).values_list("step_id", flat=True)
    )
    completions = Counter(
        Task.objects.filter(directive_id__in=ids, kind=Task.Kind.COMPLETION).values_list("directive_id", flat=True)
    )
    duplicates = {
        "execution tasks per step attempt": sum(1 for s in steps if executions[s["id"]] > s["rework_count"] + 1),
        "evaluator tasks per step attempt": sum(
            1 for s in steps if s["id"] in evaluated and monitoring[s["id"]] > s["rework_count"] + 1
        ),
        "completion tasks": sum(1 for n in completions.values() if n > 1),
    }
    assert set(double_dispatches.values()) == {0}, double_dispatches
    assert set(duplicates.values()) == {0}, duplicates

    # Nothing was lost either: every directive completed, every step passed once,
    # after exactly one execution task (and evaluator, where asked) per attempt.
    statuses = Counter(Directive.objects.filter(pk__in=ids).values_list("status", flat=True))
    assert statuses == {Directive.Status.COMPLETED: DIRECTIVES}, _stuck_report(ids, race)
    assert len(steps) == DIRECTIVES * STEPS
    assert {s["status"] for s in steps} == {Step.Status.PASSED}
    assert all(executions[s["id"]] == s["rework_count"] + 1 for s in steps)
    assert set(monitoring) == evaluated
    assert all(monitoring[s["id"]] == s["rework_count"] + 1 for s in steps if s["id"] in evaluated)
    assert completions == dict.fromkeys(ids, 1)
    reworked = sum(s["rework_count"] for s in steps)
    assert reworked >= DIRECTIVES  # the rework path was raced too
    assert {(t["status"], t["attempt"]) for t in tasks} == {(Task.Status.DONE, 1)}
    assert all(starting[str(t["id"])] == 1 and spawns[t["id"]] == 1 for t in tasks)
    assert not DaemonCommand.objects.exclude(status=DaemonCommand.Status.ACKED).exists()
    per_event = {
        event_type: Counter(
            DirectiveEvent.objects.filter(directive_id__in=ids, event_type=event_type).values_list(
                "subject_id", flat=True
            )
        )
        for event_type in ("step_passed", "task_done", "directive_completed")
    }
    assert set(per_event["step_passed"].values()) == {1} and len(per_event["step_passed"]) == DIRECTIVES * STEPS
    assert set(per_event["task_done"].values()) == {1} and len(per_event["task_done"]) == len(tasks)
    assert per_event["directive_completed"] == {str(i): 1 for i in ids}

    kinds = Counter(t["kind"] for t in tasks)
    print(
        f"\nraces: {DIRECTIVES} directives × {STEPS} steps in {elapsed:.1f} s; "
        f"{kinds[Task.Kind.EXECUTION]} execution attempts ({reworked} reworks), "
        f"{kinds[Task.Kind.MONITORING]} evaluator tasks, {kinds[Task.Kind.COMPLETION]} completion tasks; "
        f"{race.ticks} ticks, {race.advances} advance calls, {race.reports} reports "
        f"({race.duplicate_reports} sent twice at once); double dispatches 0, duplicate completions 0"
    )

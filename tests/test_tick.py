"""The orchestrator tick: its commands, its schedule, and its query budget."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.models import Schedule

from daemons.models import Daemon
from directives import lifecycle
from directives.models import Directive, Step
from tests.factories import make_daemon, make_steady_directives


def test_setup_schedules_is_idempotent_and_removes_obsolete_schedules(db, settings):
    settings.MAKIMA_TICK_SECONDS = 15
    Schedule.objects.create(name="makima.old_job", func="directives.tasks.gone", schedule_type=Schedule.HOURLY)
    Schedule.objects.create(name="someone-else", func="math.floor", args="1.5", schedule_type=Schedule.HOURLY)

    out = StringIO()
    call_command("setup_schedules", stdout=out)
    call_command("setup_schedules", stdout=out)

    tick = Schedule.objects.get(name="makima.orchestrator_tick")
    assert tick.func == "directives.tasks.orchestrator_tick"
    assert (tick.schedule_type, tick.cron, tick.repeats) == (Schedule.CRON, "* * * * * */15", -1)
    assert Schedule.objects.filter(name="makima.orchestrator_tick").count() == 1
    assert not Schedule.objects.filter(name="makima.old_job").exists()
    assert Schedule.objects.filter(name="someone-else").exists()
    assert "deleted obsolete schedule makima.old_job" in out.getvalue()


@pytest.mark.parametrize(("seconds", "cron"), [(30, "* * * * * */30"), (60, "*/1 * * * *"), (300, "*/5 * * * *")])
def test_the_tick_cron_follows_makima_tick_seconds(seconds, cron):
    from directives.management.commands.setup_schedules import tick_cron

    assert tick_cron(seconds) == cron


def test_the_scheduled_function_runs_the_tick(db):
    from directives.tasks import orchestrator_tick

    stats = orchestrator_tick()
    assert "seconds" in stats


def test_orchestrator_tick_prints_what_it_did(db):
    out = StringIO()
    call_command("orchestrator_tick", stdout=out)
    assert "seconds=" in out.getvalue()


def test_orchestrator_tick_loop_ticks_until_stopped(db, monkeypatch):
    ticks = []
    real_tick = lifecycle.tick

    def counting_tick():
        ticks.append(1)
        return real_tick()

    def stop_after_two(seconds):
        if len(ticks) >= 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("directives.management.commands.orchestrator_tick.tick", counting_tick)
    monkeypatch.setattr("directives.management.commands.orchestrator_tick.time.sleep", stop_after_two)
    # Inside the test's transaction, recycling the connection would close it.
    monkeypatch.setattr("directives.management.commands.orchestrator_tick.close_old_connections", lambda: None)
    with pytest.raises(KeyboardInterrupt):
        call_command("orchestrator_tick", "--loop", "--interval", "0.01", stdout=StringIO())
    assert len(ticks) == 2


# --------------------------------------------------------------------------- query budget


def _tick_queries(owner, daemon, count: int) -> int:
    make_steady_directives(owner, daemon, count)
    with CaptureQueriesContext(connection) as queries:
        stats = lifecycle.tick()
    assert stats.get("dispatched", 0) == 0
    return len(queries)


def test_a_tick_uses_the_same_number_of_queries_for_10_and_1000_directives(alice):
    daemon = make_daemon(alice, status=Daemon.Status.CONNECTED, last_seen_at=timezone.now(), max_concurrent_tasks=5000)
    small = _tick_queries(alice, daemon, 10)
    Directive.objects.all().delete()
    large = _tick_queries(alice, daemon, 1000)
    assert small == large
    assert Step.objects.filter(status=Step.Status.RUNNING).count() == 1000


# --------------------------------------------------------------------------- query budget per phase


def _in_flight(owner, daemon, count: int, phase: str) -> None:
    """``count`` directives waiting on a running task of one phase: a planner,
    an evaluator, or a completion task."""
    from contracts.models import Task
    from directives.models import ApprovalRequest, Chain

    status = {"planning": Directive.Status.PLANNING, "completion": Directive.Status.COMPLETING}.get(
        phase, Directive.Status.ACTIVE
    )
    directives = Directive.objects.bulk_create(
        [
            Directive(
                owner=owner, title=f"{phase}{i}", goal="g", status=status, agent="scripted", started_at=timezone.now()
            )
            for i in range(count)
        ]
    )
    kind = {"planning": Task.Kind.PLANNING, "monitoring": Task.Kind.MONITORING, "completion": Task.Kind.COMPLETION}[
        phase
    ]
    tasks = Task.objects.bulk_create(
        [
            Task(
                owner=owner,
                name="t",
                kind=kind,
                agent="scripted",
                plan="p",
                status=Task.Status.RUNNING,
                daemon=daemon,
                directive=d,
            )
            for d in directives
        ]
    )
    if phase == "planning":
        for directive, task in zip(directives, tasks, strict=True):
            directive.orchestrator_task = task
        Directive.objects.bulk_update(directives, ["orchestrator_task"])
    elif phase == "completion":
        for directive, task in zip(directives, tasks, strict=True):
            directive.completion_task = task
        Directive.objects.bulk_update(directives, ["completion_task"])
    else:
        chains = Chain.objects.bulk_create(
            [Chain(owner=owner, directive=d, generation=1, name="c") for d in directives]
        )
        for directive, chain in zip(directives, chains, strict=True):
            directive.current_chain = chain
        Directive.objects.bulk_update(directives, ["current_chain"])
        steps = Step.objects.bulk_create(
            [
                Step(owner=owner, directive=d, chain=c, name="A", generation=1, status=Step.Status.EVALUATING)
                for d, c in zip(directives, chains, strict=True)
            ]
        )
        for step, task in zip(steps, tasks, strict=True):
            step.monitoring_task = task
        Step.objects.bulk_update(steps, ["monitoring_task"])
        ApprovalRequest.objects.bulk_create(
            [ApprovalRequest(owner=owner, directive=d, kind="step_review", description="later") for d in directives]
        )


def _queries(function) -> int:
    with CaptureQueriesContext(connection) as queries:
        function()
    return len(queries)


@pytest.mark.parametrize("phase", ["planning", "monitoring", "completion"])
def test_each_phase_in_flight_costs_the_same_queries_for_10_and_1000_directives(alice, phase):
    daemon = make_daemon(alice, status=Daemon.Status.CONNECTED, last_seen_at=timezone.now(), max_concurrent_tasks=5000)
    counts = {}
    for size in (10, 1000):
        Directive.objects.all().delete()
        _in_flight(alice, daemon, size, phase)
        counts[size] = (_queries(lifecycle.reconcile), _queries(lifecycle.advance))
    assert counts[10] == counts[1000], counts
    assert counts[10][1] > 2  # it did read the directives and their tasks
    assert not Directive.objects.exclude(status__in=["planning", "active", "completing"]).exists()

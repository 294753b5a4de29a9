"""Two tick processes and in-process event handlers race over 200 directives on
PostgreSQL: no step is dispatched twice and no directive gets a second
completion task."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.db import connection
from django.db.models import Count
from django.utils import timezone

from contracts.models import Task
from daemons.models import Daemon, DaemonCommand
from directives import lifecycle
from directives.models import Chain, Directive, Step
from tests.factories import make_daemon, make_user

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVES = 200

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="real concurrent transactions need PostgreSQL"),
]


def _directives(owner, *, step_status: str, steps: int = 3) -> list[Directive]:
    now = timezone.now()
    directives = Directive.objects.bulk_create(
        [
            Directive(
                owner=owner, title=f"R{i}", goal="g", status=Directive.Status.ACTIVE, agent="scripted", started_at=now
            )
            for i in range(DIRECTIVES)
        ]
    )
    chains = Chain.objects.bulk_create([Chain(owner=owner, directive=d, generation=1, name="c") for d in directives])
    for directive, chain in zip(directives, chains, strict=True):
        directive.current_chain = chain
    Directive.objects.bulk_update(directives, ["current_chain"])
    Step.objects.bulk_create(
        [
            Step(owner=owner, directive=d, chain=c, name=f"S{n}", generation=1, status=step_status)
            for d, c in zip(directives, chains, strict=True)
            for n in range(steps)
        ]
    )
    return directives


def _race(directives: list[Directive]) -> None:
    """Two `manage.py orchestrator_tick` processes against this test database,
    and two threads running the event handlers' `advance`, all at once."""
    env = {**os.environ, "DATABASE_URL": _database_url(), "MAKIMA_LOG_LEVEL": "WARNING"}
    processes = [
        subprocess.Popen(
            [sys.executable, "manage.py", "orchestrator_tick"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    ids = [d.pk for d in directives]
    errors: list[BaseException] = []

    def handler(chunk: list) -> None:
        try:
            for directive_id in chunk:
                lifecycle.advance(directive_ids=[directive_id])
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=handler, args=(ids[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
    assert not errors, errors


def _database_url() -> str:
    s = connection.settings_dict
    return f"postgresql://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def test_racing_ticks_and_handlers_dispatch_every_step_exactly_once():
    alice = make_user("alice")
    make_daemon(
        alice,
        status=Daemon.Status.CONNECTED,
        last_seen_at=timezone.now(),
        max_concurrent_tasks=10_000,
        capabilities=["scripted"],
    )
    directives = _directives(alice, step_status=Step.Status.PENDING)

    _race(directives)

    steps = Step.objects.filter(directive__in=directives)
    assert steps.count() == DIRECTIVES * 3
    assert not steps.exclude(status=Step.Status.RUNNING).exists()
    per_step = Task.objects.filter(kind=Task.Kind.EXECUTION).values("step").annotate(n=Count("id"))
    assert {row["n"] for row in per_step} == {1}
    assert len(per_step) == DIRECTIVES * 3
    spawns = DaemonCommand.objects.filter(command_type="spawn_task").values("task").annotate(n=Count("id"))
    assert {row["n"] for row in spawns} == {1}
    assert len(spawns) == DIRECTIVES * 3


def test_racing_ticks_and_handlers_create_one_completion_task_per_directive():
    alice = make_user("alice")
    directives = _directives(alice, step_status=Step.Status.PASSED)

    _race(directives)

    assert set(Directive.objects.filter(pk__in=[d.pk for d in directives]).values_list("status", flat=True)) == {
        Directive.Status.COMPLETING
    }
    per_directive = Task.objects.filter(kind=Task.Kind.COMPLETION).values("directive").annotate(n=Count("id"))
    assert {row["n"] for row in per_directive} == {1}
    assert len(per_directive) == DIRECTIVES

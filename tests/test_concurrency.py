"""Races between real threads on PostgreSQL: compare-and-set transitions and
the step-name check let exactly one of several concurrent workers win.

SQLite serialises writers on one file lock, so these races only mean
something on PostgreSQL; elsewhere the tests are skipped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import F

from contracts.models import Task
from contracts.services import task_transition
from directives.models import Directive, DirectiveEvent, Step
from directives.services import StepSpec, step_transition, steps_add
from makima.state import SYSTEM, InvalidTransition
from tests.factories import make_daemon, make_directive, make_steps, make_task

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="real concurrent transactions need PostgreSQL (set DATABASE_URL=postgresql://…)",
    ),
]

THREADS = 8
ROUNDS = 20

WON, NO_OP, REFUSED = "won", "no-op", "refused"


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def race(workers: list[Callable[[], Any]]) -> list[Any]:
    """Run every worker in its own thread, released together by a barrier.

    Each worker gets its own database connection (Django's are per thread)
    and closes it at the end. Returns each worker's result, or the exception
    it raised.
    """
    barrier = threading.Barrier(len(workers))
    results: list[Any] = [None] * len(workers)

    def run(index: int, work: Callable[[], Any]) -> None:
        try:
            prepared = work()
            barrier.wait(timeout=10)
            results[index] = prepared()
        except Exception as exc:
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, w)) for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    return results


def outcome(result: Any) -> str:
    if result is True:
        return WON
    if result is False:
        return NO_OP
    if isinstance(result, InvalidTransition):
        return REFUSED
    raise AssertionError(f"unexpected result of a racing transition: {result!r}")


def test_only_one_of_several_workers_starts_a_ready_step(alice):
    directive = make_directive(alice)
    for round_ in range(ROUNDS):
        [step] = make_steps(directive, {"name": f"Step {round_}"})
        Step.objects.filter(pk=step.pk).update(status=Step.Status.READY)

        def worker(pk: Any = step.pk) -> Callable[[], bool]:
            # Load this thread's own instance before the barrier, race after it.
            own = Step.objects.get(pk=pk)
            return lambda: step_transition(step=own, to=Step.Status.RUNNING)

        outcomes = [outcome(r) for r in race([worker] * THREADS)]

        assert outcomes.count(WON) == 1, f"round {round_}: {outcomes}"
        assert set(outcomes) <= {WON, NO_OP, REFUSED}
        assert DirectiveEvent.objects.filter(step_id=step.pk, event_type="step_running").count() == 1
        assert Step.objects.get(pk=step.pk).status == Step.Status.RUNNING


def test_only_one_daemon_gets_a_pending_task_and_its_version_is_bumped_once(alice):
    directive = make_directive(alice)
    daemons = [make_daemon(alice, name=f"box-{i}") for i in range(THREADS)]
    for round_ in range(ROUNDS):
        task = make_task(directive, name=f"Task {round_}")

        def worker(daemon: Any, pk: Any = task.pk) -> Callable[[], Callable[[], bool]]:
            def prepare() -> Callable[[], bool]:
                own = Task.objects.get(pk=pk)
                return lambda: task_transition(
                    task=own,
                    to=Task.Status.STARTING,
                    expected=Task.Status.PENDING,
                    updates={"version": F("version") + 1, "daemon": daemon},
                )

            return prepare

        results = race([worker(daemon) for daemon in daemons])
        outcomes = [outcome(r) for r in results]

        assert outcomes.count(WON) == 1, f"round {round_}: {outcomes}"
        winner = daemons[outcomes.index(WON)]
        task.refresh_from_db()
        assert task.status == Task.Status.STARTING
        assert task.daemon_id == winner.pk
        assert task.version == 1
        assert DirectiveEvent.objects.filter(subject_id=str(task.pk), event_type="task_starting").count() == 1


def test_two_batches_adding_the_same_step_name_leave_one_step(alice):
    for round_ in range(ROUNDS):
        # A fresh draft each round: the first batch also creates its chain.
        directive = make_directive(alice, title=f"Race {round_}")

        def worker(pk: Any = directive.pk) -> Callable[[], list[Step]]:
            own = Directive.objects.get(pk=pk)
            return lambda: steps_add(directive=own, specs=[StepSpec(name="Same name")], actor=SYSTEM)

        results = race([worker, worker])

        succeeded = [r for r in results if isinstance(r, list)]
        refused = [r for r in results if isinstance(r, ValidationError)]
        assert (len(succeeded), len(refused)) == (1, 1), f"round {round_}: {results!r}"
        assert "already has a step with this name" in str(refused[0])
        assert Step.objects.filter(directive=directive, name="Same name").count() == 1
        assert directive.chains.count() == 1

"""Directive page render time and query count at 50, 200 and 500 steps.

    .venv/bin/python bench/directive_page.py            # SQLite in a temporary file
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/makima_bench .venv/bin/python bench/directive_page.py

Each directive is a layered plan (20 steps per layer, each step depending on
one or two steps of the layer before), half of it passed: every executed step
has an execution task, an evaluator task and an evaluation with criteria and
verifier results; one step in five was reworked once (two attempts). Each
directive has 1,000 events. The page is rendered through the test client as
the owner, without and with a step selected.
"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta
from typing import Any

from _setup import django_setup

SIZES = (50, 200, 500)
EVENTS = 1000
REPEATS = 5


def build(owner: Any, steps: int) -> tuple[Any, Any]:
    """A directive of ``steps`` steps and its first step (models are imported once Django is set up)."""
    from django.utils import timezone

    from contracts.models import Task, TaskOutput
    from directives.models import Chain, Directive, DirectiveEvent, Evaluation, Step, StepDependency
    from tests.factories import make_directive

    directive = make_directive(owner, title=f"Bench directive, {steps} steps")
    chain = Chain.objects.create(owner=owner, directive=directive, generation=1, name="Bench plan")
    Directive.objects.filter(pk=directive.pk).update(current_chain=chain, status=Directive.Status.ACTIVE)
    now = timezone.now()
    rows = Step.objects.bulk_create(
        Step(
            owner=owner,
            directive=directive,
            chain=chain,
            generation=1,
            name=f"Implement part {i:03d} of the feature",
            description="Make the change and cover it with tests.",
            task_plan="1. Read the code\n2. Change it\n3. Test it",
            order_index=i // 20,
            status=Step.Status.PASSED if i < steps // 2 else Step.Status.PENDING,
            rework_count=1 if i % 5 == 0 and i < steps // 2 else 0,
        )
        for i in range(steps)
    )
    links = []
    for i in range(20, steps):
        links.append(StepDependency(step=rows[i], depends_on=rows[i - 20], position=0))
        if i % 3 == 0:
            links.append(StepDependency(step=rows[i], depends_on=rows[i - 19 if i % 20 != 19 else i - 21], position=1))
    StepDependency.objects.bulk_create(links)
    verifiers = [
        {
            "name": "pytest",
            "command": "pytest -q",
            "passed": True,
            "exit_code": 0,
            "duration_s": 12.5,
            "output_tail": "3 passed",
        }
    ]
    criteria = [
        {"criterion": "GET /healthz answers 200", "passed": True, "score": 0.9, "evidence": "test_healthz passes"},
        {"criterion": "Documented", "passed": True, "score": 0.8, "evidence": "README updated"},
    ]
    tasks, evaluations = [], []
    for step in rows[: steps // 2]:
        attempts = 2 if step.rework_count else 1
        for a in range(attempts):
            started = now - timedelta(minutes=30 - 10 * a)
            for kind in (Task.Kind.EXECUTION, Task.Kind.MONITORING):
                tasks.append(
                    Task(
                        owner=owner,
                        name=step.name,
                        kind=kind,
                        agent="scripted",
                        plan="p",
                        status=Task.Status.DONE,
                        directive=directive,
                        step=step,
                        branch=f"makima/part-{step.pk.hex[:8]}",
                        commit_sha="0123456789abcdef0123456789abcdef01234567",
                        cost_usd="0.12",
                        verifier_results=verifiers if kind == Task.Kind.EXECUTION else [],
                        started_at=started,
                        finished_at=started + timedelta(minutes=4),
                    )
                )
            passed = a == attempts - 1
            evaluations.append(
                Evaluation(
                    owner=owner,
                    directive=directive,
                    chain=chain,
                    step=step,
                    kind=Evaluation.Kind.COMPOSITE,
                    passed=passed,
                    overall_score=0.9 if passed else 0.4,
                    confidence_level="green" if passed else "red",
                    criteria_results=criteria,
                    verifier_results=verifiers,
                    summary_feedback="Looks good." if passed else "A test is missing.",
                    rework_instructions="" if passed else "Add a test for the error path.",
                )
            )
    Task.objects.bulk_create(tasks)
    Evaluation.objects.bulk_create(evaluations)
    TaskOutput.objects.bulk_create(
        TaskOutput(task=task, seq=n, content=f"line {n} of {task.name}") for task in tasks[:20] for n in range(200)
    )
    DirectiveEvent.objects.bulk_create(
        DirectiveEvent(
            directive=directive,
            step=rows[i % steps],
            event_type="step_transition",
            severity=("info", "warn", "error")[i % 3],
            message=f"Step moved on ({i}).",
            actor_type="system",
        )
        for i in range(EVENTS)
    )
    return directive, rows[0]


def measure(client: Any, url: str) -> tuple[float, float, int, int]:
    """Median wall and CPU milliseconds, query count and response size of
    ``REPEATS`` renders (CPU time is the steadier figure on a shared machine)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    wall, cpu, queries, size = [], [], 0, 0
    for _ in range(REPEATS):
        with CaptureQueriesContext(connection) as captured:
            started, started_cpu = time.perf_counter(), time.process_time()
            response = client.get(url)
            wall.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - started_cpu) * 1000)
        assert response.status_code == 200, response.status_code
        queries, size = len(captured), len(response.content)
    return statistics.median(wall), statistics.median(cpu), queries, size


def main() -> None:
    vendor = django_setup()
    from django.contrib.auth.models import User
    from django.test import Client
    from django.test.utils import setup_test_environment
    from django.urls import reverse

    setup_test_environment()  # lets the test client's host through ALLOWED_HOSTS
    owner, _ = User.objects.get_or_create(username="bench")
    client = Client()
    client.force_login(owner)
    print(f"database: {vendor}; {EVENTS} events per directive; median of {REPEATS} renders")
    print(f"{'steps':>6} {'page':>6} {'queries':>8} {'median ms':>10} {'cpu ms':>7} {'KiB':>6}")
    for size in SIZES:
        directive, first = build(owner, size)
        url = reverse("directive-detail", args=[directive.pk])
        client.get(url)  # warm the template cache
        for label, target in (("plain", url), ("step", f"{url}?step={first.pk}")):
            ms, cpu, queries, length = measure(client, target)
            print(f"{size:>6} {label:>6} {queries:>8} {ms:>10.1f} {cpu:>7.1f} {length / 1024:>6.0f}")


if __name__ == "__main__":
    main()

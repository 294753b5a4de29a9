"""``GET /metrics``: Prometheus text that parses, figures that match the rows,
a fixed number of queries, and access by token or from this machine only."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.models import Task as QueuedTask
from django_q.tasks import async_task
from prometheus_client.parser import text_string_to_metric_families

from contracts.models import Task
from contracts.services import task_create, task_dispatch_pending, task_transition
from daemons.models import Daemon, DaemonCommand
from directives.models import Directive
from makima import metrics
from tests.factories import make_command, make_daemon, make_directive, make_task

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)


def scrape(client: Any, **extra: Any) -> dict[str, Any]:
    """GET /metrics, parsed by the Prometheus client library's own parser."""
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.content.decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for family in families.values():
        assert text.count(f"# TYPE {family.name} ") == 1
        if family.type == "histogram":
            buckets = [s for s in family.samples if s.name.endswith("_bucket")]
            counts = [s.value for s in buckets]
            assert counts == sorted(counts), f"{family.name}: buckets must be cumulative"
            assert buckets[-1].labels["le"] == "+Inf"
            assert buckets[-1].value == sample(family, "_count")
    return families


def by_label(family: Any, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in family.samples}


def sample(family: Any, suffix: str = "", **labels: str) -> float:
    (match,) = [s for s in family.samples if s.name == family.name + suffix and s.labels == labels]
    return match.value


def test_metrics_count_tasks_directives_daemons_and_undelivered_commands(client, alice, bob):
    drafts = make_directive(alice)
    active = make_directive(alice, title="Second")
    Directive.objects.filter(pk=active.pk).update(status=Directive.Status.ACTIVE)
    make_directive(bob, title="Bob's")
    for status, count in (("pending", 3), ("running", 2), ("done", 1), ("interrupted", 1)):
        for _ in range(count):
            make_task(drafts, status=status)
    box1 = make_daemon(alice, "box-1", status=Daemon.Status.CONNECTED)
    make_daemon(bob, "box-2", status=Daemon.Status.CONNECTED)
    make_daemon(alice, "box-3", status=Daemon.Status.DISCONNECTED)
    commands = [make_command(box1) for _ in range(5)]
    DaemonCommand.objects.filter(pk=commands[0].pk).update(status=DaemonCommand.Status.SENT)
    DaemonCommand.objects.filter(pk__in=[commands[1].pk, commands[2].pk]).update(status=DaemonCommand.Status.ACKED)

    families = scrape(client)

    assert by_label(families["makima_tasks"], "status") == {
        "pending": 3,
        "starting": 0,
        "running": 2,
        "paused": 0,
        "done": 1,
        "failed": 0,
        "interrupted": 1,
        "cancelled": 0,
    }
    directives = by_label(families["makima_directives"], "status")
    assert set(directives) == set(Directive.Status.values)
    assert directives["draft"] == 2 and directives["active"] == 1 and sum(directives.values()) == 3
    assert sample(families["makima_daemons_connected"]) == 2
    assert by_label(families["makima_outbox_depth"], "status") == {"queued": 2, "sent": 1}


def test_the_outbox_age_is_that_of_the_oldest_command_not_yet_acknowledged(client, alice):
    daemon = make_daemon(alice, status=Daemon.Status.CONNECTED)
    with time_machine.travel(T0, tick=False) as traveller:
        acked = make_command(daemon)
        DaemonCommand.objects.filter(pk=acked.pk).update(status=DaemonCommand.Status.ACKED)
        traveller.shift(10)
        make_command(daemon)  # the oldest one still undelivered
        traveller.shift(5)
        make_command(daemon)
        traveller.shift(27)

        families = scrape(client)

    assert sample(families["makima_outbox_oldest_age_seconds"]) == 32.0
    DaemonCommand.objects.update(status=DaemonCommand.Status.ACKED)
    assert sample(scrape(client)["makima_outbox_oldest_age_seconds"]) == 0


def test_dispatch_latency_runs_from_becoming_pending_to_dispatch_retries_included(client, alice):
    """A task created at T0 and dispatched 2.5 s later; interrupted, put back to
    pending and dispatched again 0.3 s after that; and a dispatch two hours ago,
    outside the one-hour window."""
    daemon = make_daemon(alice, status=Daemon.Status.CONNECTED, max_concurrent_tasks=5)
    with time_machine.travel(T0 - timedelta(hours=2), tick=False) as traveller:
        old = task_create(owner=alice, name="Old", kind=Task.Kind.EXECUTION, agent="scripted", plan="p")
        traveller.shift(40)
        assert task_dispatch_pending(owner_ids=[alice.pk]) == [old]

        traveller.move_to(T0)
        task = task_create(owner=alice, name="New", kind=Task.Kind.EXECUTION, agent="scripted", plan="p")
        traveller.shift(2.5)
        assert task_dispatch_pending(owner_ids=[alice.pk]) == [task]

        traveller.shift(7.5)
        task.refresh_from_db()
        assert task_transition(task=task, to=Task.Status.INTERRUPTED)
        assert task_transition(
            task=task,
            to=Task.Status.PENDING,
            expected=Task.Status.INTERRUPTED,
            updates={"daemon": None, "version": F("version") + 1, "attempt": F("attempt") + 1},
        )
        traveller.shift(0.3)
        assert task_dispatch_pending(owner_ids=[alice.pk]) == [task]
        traveller.shift(60)

        latency = scrape(client)["makima_dispatch_latency_seconds"]

    assert sample(latency, "_count") == 2
    assert sample(latency, "_sum") == pytest.approx(2.8)
    assert sample(latency, "_bucket", le="0.25") == 0
    assert sample(latency, "_bucket", le="0.5") == 1
    assert sample(latency, "_bucket", le="2.5") == 2
    assert sample(latency, "_bucket", le="+Inf") == 2
    assert Task.objects.get(pk=task.pk).daemon_id == daemon.pk


def test_tick_duration_comes_from_the_runs_django_q_recorded(client):
    """A real run of the orchestrator_tick task through django-q2 (synchronously,
    so that django-q2 itself records it), then recorded runs of known lengths."""
    async_task(metrics.TICK_FUNC, sync=True)
    (run,) = QueuedTask.objects.filter(func=metrics.TICK_FUNC)
    assert run.success and isinstance(run.result["seconds"], float)

    families = scrape(client)

    assert sample(families["makima_tick_duration_seconds"], "_count") == 1
    assert sample(families["makima_tick_duration_seconds"], "_sum") == pytest.approx(run.result["seconds"])
    assert sample(families["makima_tick_last_run_timestamp_seconds"]) == pytest.approx(run.stopped.timestamp())
    assert sample(families["makima_tick_last_run_success"]) == 1

    QueuedTask.objects.all().delete()

    def record(func: str, stopped_at: datetime, *, result: Any, success: bool = True, took: float = 9.0) -> None:
        QueuedTask.objects.create(
            id=uuid.uuid4().hex,
            name=f"run-{uuid.uuid4().hex[:6]}",
            func=func,
            started=stopped_at - timedelta(seconds=took),
            stopped=stopped_at,
            success=success,
            result=result,
        )

    record(metrics.TICK_FUNC, T0, result={"seconds": 0.2})
    record(metrics.TICK_FUNC, T0 + timedelta(seconds=30), result={"seconds": 3.0, "dispatched": 4})
    # A failed run has a traceback for a result: its length is stopped - started.
    record(metrics.TICK_FUNC, T0 + timedelta(seconds=60), result="Traceback …", success=False, took=7.0)
    record("directives.tasks.something_else", T0 + timedelta(seconds=90), result={"seconds": 50.0})

    families = scrape(client)

    ticks = families["makima_tick_duration_seconds"]
    assert sample(ticks, "_count") == 3
    assert sample(ticks, "_sum") == pytest.approx(10.2)
    assert sample(ticks, "_bucket", le="0.25") == 1
    assert sample(ticks, "_bucket", le="5.0") == 2
    assert sample(ticks, "_bucket", le="10.0") == 3
    assert sample(families["makima_tick_last_duration_seconds"]) == 7.0
    assert sample(families["makima_tick_last_run_success"]) == 0
    assert sample(families["makima_tick_last_run_timestamp_seconds"]) == (T0 + timedelta(seconds=60)).timestamp()


def test_without_any_tick_recorded_the_tick_histogram_is_empty_and_no_last_run_is_claimed(client):
    families = scrape(client)

    assert sample(families["makima_tick_duration_seconds"], "_count") == 0
    assert "makima_tick_last_run_timestamp_seconds" not in families
    assert sample(families["makima_dispatch_latency_seconds"], "_count") == 0


def _queries_for_one_scrape(client: Any) -> int:
    with CaptureQueriesContext(connection) as queries:
        scrape(client)
    return len(queries)


def test_a_scrape_costs_the_same_few_queries_however_many_rows_there_are(client, alice, django_assert_max_num_queries):
    with django_assert_max_num_queries(6):
        scrape(client)
    few = _queries_for_one_scrape(client)

    make_daemon(alice, status=Daemon.Status.CONNECTED, max_concurrent_tasks=50)
    for n in range(20):
        directive = make_directive(alice, title=f"D{n}")
        make_task(directive, status="pending")
    for n in range(30):
        task_create(owner=alice, name=f"T{n}", kind=Task.Kind.EXECUTION, agent="scripted", plan="p")
    assert len(task_dispatch_pending(owner_ids=[alice.pk])) == 30
    for n in range(10):
        QueuedTask.objects.create(
            id=uuid.uuid4().hex,
            name=f"tick-{n}",
            func=metrics.TICK_FUNC,
            started=timezone.now(),
            stopped=timezone.now(),
            result={"seconds": 0.1},
        )

    many = _queries_for_one_scrape(client)

    assert many == few <= 6
    assert sample(scrape(client)["makima_dispatch_latency_seconds"], "_count") == 30


# --------------------------------------------------------------------------- access


def test_with_a_token_set_metrics_want_that_bearer_token(client, settings):
    settings.MAKIMA_METRICS_TOKEN = "scrape-me-7f3a"

    missing = client.get("/metrics")
    wrong = client.get("/metrics", headers={"Authorization": "Bearer scrape-me-0000"})
    right = client.get("/metrics", headers={"Authorization": "Bearer scrape-me-7f3a"}, REMOTE_ADDR="10.1.2.3")

    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    assert wrong.status_code == 401
    assert b"makima_tasks" not in missing.content + wrong.content
    assert right.status_code == 200 and b"makima_tasks" in right.content


def test_without_a_token_only_direct_requests_from_this_machine_may_read_metrics(client, settings):
    settings.MAKIMA_METRICS_TOKEN = ""

    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 403
    # A reverse proxy on this host forwards other machines' requests from loopback.
    proxied = client.get("/metrics", REMOTE_ADDR="127.0.0.1", headers={"X-Forwarded-For": "203.0.113.9"})
    assert proxied.status_code == 403
    assert b"MAKIMA_METRICS_TOKEN" in proxied.content


def test_metrics_refuse_writes(client):
    assert client.post("/metrics").status_code == 405


# --------------------------------------------------------------------------- the text format


def test_label_values_and_numbers_are_written_as_the_format_wants():
    out = metrics.Exposition()
    out.gauge("x", "Help with a \\ and\na newline.", [({"v": 'a"b\\c\nd'}, 1.5), ({"v": "n"}, math.inf)])
    out.histogram("h", "A histogram.", [0.5, 2.0, 2.0], (1.0, 2.0))

    (gauge, histogram) = text_string_to_metric_families(out.text())

    assert [(s.labels["v"], s.value) for s in gauge.samples] == [('a"b\\c\nd', 1.5), ("n", math.inf)]
    assert gauge.documentation == "Help with a \\ and a newline."
    assert [(s.name, s.labels.get("le"), s.value) for s in histogram.samples] == [
        ("h_bucket", "1.0", 1.0),
        ("h_bucket", "2.0", 3.0),
        ("h_bucket", "+Inf", 3.0),
        ("h_sum", None, 4.5),
        ("h_count", None, 3.0),
    ]

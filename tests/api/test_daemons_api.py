"""``/api/v1/daemons/``: a user's worker machines and what they are running."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from contracts.models import Task
from daemons.models import Daemon
from tests.factories import make_daemon, make_directive, make_task


def test_a_daemon_shows_its_status_capacity_and_running_tasks(api_as, alice):
    now = timezone.now()
    daemon = make_daemon(
        alice,
        status=Daemon.Status.CONNECTED,
        capabilities=["scripted", "claude"],
        max_concurrent_tasks=4,
        version="0.1.0",
        connected_at=now,
        last_seen_at=now,
    )
    directive = make_directive(alice)
    for status in (*Task.ON_DAEMON, Task.Status.DONE, Task.Status.FAILED, Task.Status.PENDING):
        make_task(directive, daemon=daemon, status=status)

    response = api_as(alice).get(f"/api/v1/daemons/{daemon.pk}/")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "build-box-1"
    assert body["status"] == "connected"
    assert body["capabilities"] == ["scripted", "claude"]
    assert body["max_concurrent_tasks"] == 4
    assert body["running_task_count"] == 3
    assert body["connected_at"] and body["last_seen_at"]
    assert "token" not in body and "connection_id" not in body


def test_daemons_are_listed_by_name_and_filtered_by_status(api_as, alice):
    make_daemon(alice, "zeta", status=Daemon.Status.CONNECTED)
    make_daemon(alice, "alpha")
    client = api_as(alice)
    names = [row["name"] for row in client.get("/api/v1/daemons/").json()["results"]]
    assert names == ["alpha", "zeta"]
    connected = client.get("/api/v1/daemons/?status=connected").json()["results"]
    assert [row["name"] for row in connected] == ["zeta"]
    assert client.get("/api/v1/daemons/?status=asleep").status_code == 400


def test_a_disconnected_daemon_with_nothing_to_do_counts_zero_tasks(api_as, alice):
    make_daemon(alice)
    [row] = api_as(alice).get("/api/v1/daemons/").json()["results"]
    assert (row["status"], row["running_task_count"], row["connected_at"]) == ("disconnected", 0, None)


def test_the_daemon_list_costs_the_same_queries_for_3_or_30_daemons(api_as, alice):
    directive = make_directive(alice)
    client = api_as(alice)

    def queries_for(count: int) -> int:
        Daemon.objects.all().delete()
        for index in range(count):
            daemon = make_daemon(alice, f"box-{index:02}")
            make_task(directive, daemon=daemon, status=Task.Status.RUNNING)
        with CaptureQueriesContext(connection) as context:
            response = client.get("/api/v1/daemons/")
        rows = response.json()["results"]
        assert len(rows) == count and all(row["running_task_count"] == 1 for row in rows)
        return len(context.captured_queries)

    assert queries_for(3) == queries_for(30)


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_daemons_are_read_only_through_the_api(api_as, alice, method):
    daemon = make_daemon(alice)
    client = api_as(alice)
    url = "/api/v1/daemons/" if method == "post" else f"/api/v1/daemons/{daemon.pk}/"
    assert getattr(client, method)(url, {"name": "renamed"}, format="json").status_code == 405
    assert Daemon.objects.get(pk=daemon.pk).name == "build-box-1"

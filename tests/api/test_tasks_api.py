"""``/api/v1/tasks/``: tasks, their output and ``makima supervisor complete``."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings

from contracts.models import Contract, Task
from contracts.services import task_output_append, task_transition
from daemons.models import ApiToken
from directives.models import DirectiveEvent
from tests.factories import make_contract, make_daemon, make_directive, make_task, make_token


@pytest.fixture
def task(alice):
    directive = make_directive(alice)
    return make_task(directive, contract=make_contract(directive))


def output(client, task, **params):
    return client.get(f"/api/v1/tasks/{task.pk}/output/", params)


# --------------------------------------------------------------------------- retrieve and list


def test_a_task_shows_what_agents_and_the_dashboard_need(api_as, alice, task):
    daemon = make_daemon(alice)
    Task.objects.filter(pk=task.pk).update(
        daemon=daemon,
        status=Task.Status.DONE,
        branch="makima/plan-1",
        cost_usd=Decimal("1.2500"),
        exit_code=0,
        summary="Planned four steps.",
        error="",
    )
    minted = make_token(alice, kind=ApiToken.Kind.TASK, task=task)
    response = api_as(alice).get(f"/api/v1/tasks/{task.pk}/")
    assert response.status_code == 200
    body = response.json()
    assert body["plan"] == "Do the work."
    assert body["status"] == "done"
    assert body["branch"] == "makima/plan-1"
    assert Decimal(body["cost_usd"]) == Decimal("1.25")
    assert body["exit_code"] == 0
    assert body["summary"] == "Planned four steps."
    assert body["error"] == ""
    assert body["daemon"] == str(daemon.pk)
    assert body["directive"] == str(task.directive_id)
    assert body["contract"] == str(task.contract_id)
    text = response.content.decode()
    assert minted.plain not in text and minted.token.digest not in text
    assert "token" not in body and "digest" not in body and "version" not in body


def test_tasks_are_listed_newest_first_and_filtered(api_as, alice):
    directive = make_directive(alice)
    other = make_directive(alice, title="Other")
    planning = make_task(directive)
    execution = make_task(directive, kind=Task.Kind.EXECUTION, status=Task.Status.RUNNING)
    elsewhere = make_task(other)
    for minutes, created in enumerate([planning, execution, elsewhere]):
        Task.objects.filter(pk=created.pk).update(created_at=created.created_at + timedelta(minutes=minutes))
    client = api_as(alice)

    def ids(query: str) -> list[str]:
        response = client.get(f"/api/v1/tasks/{query}")
        assert response.status_code == 200
        return [row["id"] for row in response.json()["results"]]

    assert ids("") == [str(elsewhere.pk), str(execution.pk), str(planning.pk)]
    assert ids(f"?directive={directive.pk}") == [str(execution.pk), str(planning.pk)]
    assert ids("?status=running") == [str(execution.pk)]
    assert ids("?kind=planning") == [str(elsewhere.pk), str(planning.pk)]
    assert ids(f"?directive={directive.pk}&kind=planning") == [str(planning.pk)]


@pytest.mark.parametrize("query", ["?status=sleeping", "?kind=poem", "?directive=not-a-uuid"])
def test_a_bad_task_filter_is_refused_with_400(api_as, alice, query):
    response = api_as(alice).get(f"/api/v1/tasks/{query}")
    assert response.status_code == 400
    assert response.json()["errors"]


def test_the_task_list_costs_the_same_queries_for_3_or_30_tasks(api_as, alice):
    directive = make_directive(alice)
    daemon = make_daemon(alice)
    client = api_as(alice)

    def queries_for(count: int) -> int:
        Task.objects.all().delete()
        for _ in range(count):
            make_task(directive, contract=make_contract(directive), daemon=daemon)
        with CaptureQueriesContext(connection) as context:
            response = client.get("/api/v1/tasks/")
        assert len(response.json()["results"]) == count
        return len(context.captured_queries)

    assert queries_for(3) == queries_for(30)


# --------------------------------------------------------------------------- output


def test_output_is_read_after_a_seq_in_seq_order(api_as, alice, task):
    task_output_append(task=task, items=[{"seq": seq, "content": f"line {seq}"} for seq in (3, 1, 5, 2, 4)])
    client = api_as(alice)

    page = output(client, task).json()
    assert [item["seq"] for item in page["items"]] == [1, 2, 3, 4, 5]
    assert page["next_after_seq"] == 5
    assert page["has_more"] is False
    assert page["task_status"] == "pending"

    page = output(client, task, after_seq=2).json()
    assert [(item["seq"], item["content"]) for item in page["items"]] == [(3, "line 3"), (4, "line 4"), (5, "line 5")]


def test_output_is_paged_with_a_limit(api_as, alice, task):
    task_output_append(task=task, items=[{"seq": seq, "content": f"line {seq}"} for seq in range(1, 8)])
    client = api_as(alice)
    seen: list[int] = []
    after = 0
    while True:
        page = output(client, task, after_seq=after, limit=3).json()
        seen += [item["seq"] for item in page["items"]]
        after = page["next_after_seq"]
        if not page["has_more"]:
            break
    assert seen == [1, 2, 3, 4, 5, 6, 7]
    assert after == 7


def test_polling_past_the_end_returns_nothing_and_keeps_the_position(api_as, alice, task):
    task_output_append(task=task, items=[{"seq": 1, "content": "only"}])
    page = output(api_as(alice), task, after_seq=1).json()
    assert page == {
        "attempt": 1,
        "items": [],
        "next_after_seq": 1,
        "has_more": False,
        "task_status": "pending",
        "task_attempt": 1,
    }


def test_a_duplicate_seq_is_ignored(api_as, alice, task):
    task_output_append(task=task, items=[{"seq": 1, "content": "first", "stream": "stdout"}])
    task_output_append(task=task, items=[{"seq": 1, "content": "again"}, {"seq": 2, "content": "second"}])
    page = output(api_as(alice), task).json()
    assert [(item["seq"], item["content"]) for item in page["items"]] == [(1, "first"), (2, "second")]
    assert page["items"][0]["stream"] == "stdout"


def test_output_of_another_task_is_not_mixed_in(api_as, alice, task):
    other = make_task(task.directive)
    task_output_append(task=task, items=[{"seq": 1, "content": "mine"}])
    task_output_append(task=other, items=[{"seq": 2, "content": "theirs"}])
    assert [item["content"] for item in output(api_as(alice), task).json()["items"]] == ["mine"]


@override_settings(MAKIMA_TASK_OUTPUT_MAX_BYTES=10)
def test_an_overlong_output_line_is_cut(api_as, alice, task):
    task_output_append(task=task, items=[{"seq": 1, "content": "x" * 50}])
    [item] = output(api_as(alice), task).json()["items"]
    assert item["content"].startswith("x" * 10) and "cut" in item["content"]


@pytest.mark.parametrize(
    "params", [{"after_seq": "abc"}, {"after_seq": -1}, {"limit": 0}, {"limit": 100000}, {"limit": "many"}]
)
def test_bad_output_parameters_are_refused_with_400(api_as, alice, task, params):
    response = output(api_as(alice), task, **params)
    assert response.status_code == 400
    assert response.json()["errors"]


def retried(task: Task) -> Task:
    """Attempt 1 wrote lines 1–3 and was lost; attempt 2 numbers its lines from 1 again."""
    task_output_append(task=task, items=[{"seq": seq, "content": f"first run {seq}"} for seq in (1, 2, 3)])
    Task.objects.filter(pk=task.pk).update(attempt=2, status=Task.Status.RUNNING)
    task.refresh_from_db()
    task_output_append(task=task, items=[{"seq": seq, "content": f"second run {seq}"} for seq in (1, 2, 3, 4)])
    return task


def test_output_shows_the_current_attempt_unless_asked_for_another(api_as, alice, task):
    client = api_as(alice)
    task = retried(task)

    page = output(client, task).json()
    assert (page["attempt"], page["task_attempt"], page["task_status"]) == (2, 2, "running")
    assert [item["content"] for item in page["items"]] == [f"second run {seq}" for seq in (1, 2, 3, 4)]
    assert (page["next_after_seq"], page["has_more"]) == (4, False)

    page = output(client, task, attempt=1).json()
    assert (page["attempt"], page["task_attempt"]) == (1, 2)
    assert [item["content"] for item in page["items"]] == [f"first run {seq}" for seq in (1, 2, 3)]
    assert page["next_after_seq"] == 3


def test_after_seq_counts_within_the_attempt_asked_for(api_as, alice, task):
    client = api_as(alice)
    task = retried(task)

    assert [item["content"] for item in output(client, task, attempt=1, after_seq=2).json()["items"]] == ["first run 3"]
    page = output(client, task, after_seq=2, limit=1).json()
    assert [item["content"] for item in page["items"]] == ["second run 3"]
    assert (page["attempt"], page["next_after_seq"], page["has_more"]) == (2, 3, True)


def test_a_follower_drains_the_old_attempt_then_reads_the_new_one_from_the_start(api_as, alice, task):
    client = api_as(alice)
    task_output_append(task=task, items=[{"seq": seq, "content": f"first run {seq}"} for seq in (1, 2)])
    page = output(client, task).json()
    attempt, after = page["attempt"], page["next_after_seq"]
    assert (attempt, after) == (1, 2)
    task_output_append(task=task, items=[{"seq": 3, "content": "first run 3"}])  # its last words
    task = retried(task)
    seen = []
    for _ in range(5):
        page = output(client, task, attempt=attempt, after_seq=after).json()
        seen += [item["content"] for item in page["items"]]
        attempt, after = page["attempt"], page["next_after_seq"]
        if not page["has_more"] and page["task_attempt"] > attempt:
            attempt, after = page["task_attempt"], 0
    assert seen == ["first run 3"] + [f"second run {seq}" for seq in (1, 2, 3, 4)]


def test_an_attempt_without_output_gives_an_empty_page(api_as, alice, task):
    client = api_as(alice)
    task_output_append(task=task, items=[{"seq": 1, "content": "only"}])
    Task.objects.filter(pk=task.pk).update(attempt=2)
    for params in ({}, {"attempt": 2}, {"attempt": 7}):
        response = output(client, task, **params)
        assert response.status_code == 200
        assert response.json()["items"] == []
    assert output(client, task, attempt=7).json()["attempt"] == 7


@pytest.mark.parametrize("attempt", [0, -1, "two", "1.5", 2**31])
def test_a_bad_attempt_is_refused_with_400_naming_the_field(api_as, alice, task, attempt):
    task_output_append(task=task, items=[{"seq": 1, "content": "only"}])
    response = output(api_as(alice), task, attempt=attempt)
    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"attempt"}
    assert Task.objects.get(pk=task.pk).attempt == 1


def test_a_stranger_gets_404_for_any_attempt_of_the_output(api_as, bob, task):
    task_output_append(task=task, items=[{"seq": 1, "content": "secret"}])
    for params in ({}, {"attempt": 1}, {"attempt": 0}):
        response = output(api_as(bob), task, **params)
        assert response.status_code == 404
        assert "secret" not in response.content.decode()


# --------------------------------------------------------------------------- complete


def test_complete_marks_the_contract_completed_and_writes_events(api_as, alice, task):
    for status in (Task.Status.STARTING, Task.Status.RUNNING):
        task_transition(task=task, to=status)
    response = api_as(alice).post(f"/api/v1/tasks/{task.pk}/complete/")
    assert response.status_code == 200
    assert response.json()["supervisor_completed_at"] is not None
    assert response.json()["status"] == "running"  # the daemon ends the task itself
    contract = Contract.objects.get(pk=task.contract_id)
    assert contract.status == Contract.Status.COMPLETED
    assert contract.completed_at is not None
    event = DirectiveEvent.objects.get(event_type="supervisor_completed", subject_id=str(task.pk))
    assert (event.actor_type, event.actor, event.directive_id) == ("user", "alice", task.directive_id)
    assert DirectiveEvent.objects.filter(event_type="contract_completed", subject_id=str(contract.pk)).exists()


def test_completing_twice_changes_nothing_more(api_as, alice, task):
    client = api_as(alice)
    first = client.post(f"/api/v1/tasks/{task.pk}/complete/").json()
    second = client.post(f"/api/v1/tasks/{task.pk}/complete/")
    assert second.status_code == 200
    assert second.json()["supervisor_completed_at"] == first["supervisor_completed_at"]
    assert DirectiveEvent.objects.filter(event_type="supervisor_completed").count() == 1


@pytest.mark.parametrize("end", [Task.Status.DONE, Task.Status.FAILED, Task.Status.CANCELLED])
def test_complete_on_a_finished_task_is_409_and_changes_nothing(api_as, alice, task, end):
    for status in (Task.Status.STARTING, Task.Status.RUNNING, end):
        task_transition(task=task, to=status)
    response = api_as(alice).post(f"/api/v1/tasks/{task.pk}/complete/")
    assert response.status_code == 409
    assert end in response.json()["detail"]
    task.refresh_from_db()
    assert task.supervisor_completed_at is None
    assert Contract.objects.get(pk=task.contract_id).status == Contract.Status.ACTIVE


def test_complete_works_for_a_task_without_contract(api_as, alice):
    task = make_task(make_directive(alice))
    assert api_as(alice).post(f"/api/v1/tasks/{task.pk}/complete/").status_code == 200


def test_complete_only_accepts_post(api_as, alice, task):
    assert api_as(alice).get(f"/api/v1/tasks/{task.pk}/complete/").status_code == 405

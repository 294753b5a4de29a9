"""The steps of a directive: add-step, read, edit, remove-step and the step actions."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from contracts.models import Task
from directives.models import Directive, DirectiveEvent, Step, StepDependency
from directives.services import step_transition
from tests.factories import make_directive, make_steps, make_task


@pytest.fixture
def client(api_as, alice):
    return api_as(alice)


@pytest.fixture
def directive(alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]}, {"name": "C", "depends_on": ["A"]})
    directive.refresh_from_db()
    return directive


def steps_url(directive: Directive) -> str:
    return f"/api/v1/directives/{directive.pk}/steps/"


def step_url(step: Step, suffix: str = "") -> str:
    return f"/api/v1/directives/{step.directive_id}/steps/{step.pk}/{suffix}"


def step(directive: Directive, name: str) -> Step:
    return Step.objects.get(directive=directive, name=name)


def move(target: Step, *statuses: str) -> Step:
    for status in statuses:
        step_transition(step=target, to=status)
    return target


def footprint(directive: Directive) -> tuple[Any, ...]:
    rows = Step.objects.filter(directive=directive).order_by("name").values_list("name", "status", "task_plan")
    links = StepDependency.objects.filter(step__directive=directive).order_by("step__name", "position")
    return (
        list(rows),
        list(links.values_list("step__name", "depends_on__name")),
        DirectiveEvent.objects.filter(directive=directive).count(),
    )


# --------------------------------------------------------------------------- add and read


def test_adding_a_step_returns_it_with_its_dependencies_as_ids_in_order(client, directive):
    c, b = step(directive, "C"), step(directive, "B")
    body = {"name": "D", "task_plan": "Merge.", "depends_on": [str(c.pk), "B"], "order_index": 2}
    response = client.post(steps_url(directive), body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["depends_on"] == [str(c.pk), str(b.pk)]
    assert (data["name"], data["status"], data["order_index"], data["task_plan"]) == ("D", "pending", 2, "Merge.")
    assert data["chain"] == str(directive.current_chain_id)
    assert DirectiveEvent.objects.filter(step_id=data["id"], event_type="step_added").exists()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": "D", "depends_on": ["Nope"]}, "step 'D': unknown dependency 'Nope'"),
        ({"name": "A"}, "step 'A': the directive already has a step with this name"),
        ({"name": "D", "wat": 1}, "wat"),
        ({"name": "D", "order_index": "first"}, "order_index"),
        ({"description": "no name"}, "name"),
    ],
)
def test_a_bad_step_is_a_400_and_adds_nothing(client, directive, body, words):
    before = footprint(directive)
    response = client.post(steps_url(directive), body, format="json")
    assert response.status_code == 400
    assert words in str(response.json())
    assert footprint(directive) == before


def test_a_step_of_another_directive_cannot_be_a_dependency(client, alice, directive):
    foreign = make_steps(make_directive(alice, title="Other"), {"name": "X"})[0]
    before = footprint(directive)
    response = client.post(steps_url(directive), {"name": "D", "depends_on": [str(foreign.pk)]}, format="json")
    assert response.status_code == 400
    assert "belongs to another directive" in response.json()["detail"]
    assert footprint(directive) == before


def test_listing_steps_shows_each_ones_dependencies_in_order(client, alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"}, {"name": "B"}, {"name": "C", "depends_on": ["B", "A"]})
    rows = {row["name"]: row for row in client.get(steps_url(directive)).json()["results"]}
    assert rows["C"]["depends_on"] == [rows["B"]["id"], rows["A"]["id"]]


def test_listing_steps_takes_the_same_number_of_queries_for_5_or_30(client, alice):
    directive = make_directive(alice)

    def count_queries() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert client.get(steps_url(directive) + "?page_size=100").status_code == 200
        return len(queries)

    def add(first: int, n: int) -> None:
        """A chain of steps, each after the previous one and (from the third on) the first."""
        names = [f"S{i}" for i in range(first, first + n)]
        specs: list[dict[str, Any]] = [{"name": names[0]}]
        for i, name in enumerate(names[1:], start=1):
            specs.append({"name": name, "depends_on": [names[i - 1]] if i == 1 else [names[i - 1], names[0]]})
        make_steps(directive, *specs)

    add(0, 5)
    few = count_queries()
    add(5, 25)
    assert Step.objects.filter(directive=directive).count() == 30
    assert count_queries() == few


# --------------------------------------------------------------------------- edit


def test_patching_depends_on_replaces_the_dependency_list(client, directive):
    a, b, c = step(directive, "A"), step(directive, "B"), step(directive, "C")
    response = client.patch(step_url(c), {"depends_on": [str(b.pk), "A"]}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["depends_on"] == [str(b.pk), str(a.pk)]
    response = client.patch(step_url(c), {"depends_on": []}, format="json")
    assert response.json()["depends_on"] == []


def test_patching_other_fields_keeps_the_dependencies(client, directive):
    b = step(directive, "B")
    response = client.patch(step_url(b), {"task_plan": "New plan", "editor_x": 10.5}, format="json")
    assert response.status_code == 200
    assert response.json()["task_plan"] == "New plan"
    assert response.json()["depends_on"] == [str(step(directive, "A").pk)]
    assert DirectiveEvent.objects.filter(step=b, event_type="step_updated").exists()


def test_put_replaces_a_step_with_defaults_for_what_is_left_out(client, directive):
    b = step(directive, "B")
    client.patch(step_url(b), {"task_plan": "Old plan"}, format="json")
    response = client.put(step_url(b), {"name": "B2"}, format="json")
    assert response.status_code == 200
    data = response.json()
    assert (data["name"], data["task_plan"], data["depends_on"]) == ("B2", "", [])


@pytest.mark.parametrize(
    ("target", "body", "words"),
    [
        ("A", {"depends_on": ["C"]}, "dependency cycle: 'B' → 'A' → 'C' → 'B'"),
        ("B", {"depends_on": ["Nope"]}, "step 'B': unknown dependency 'Nope'"),
        ("B", {"depends_on": ["B"]}, "step 'B': depends on itself"),
        ("B", {"name": "C"}, "the directive already has a step named 'C'"),
        ("B", {"status": "passed"}, "read-only"),
        ("B", {"depends_on": "A"}, "Expected a list"),
        ("B", {"order_index": -2}, "greater than or equal to 0"),
    ],
)
def test_a_bad_edit_is_a_400_and_changes_nothing(client, directive, target, body, words):
    client.patch(step_url(step(directive, "C")), {"depends_on": ["B"]}, format="json")
    before = footprint(directive)
    response = client.patch(step_url(step(directive, target)), body, format="json")
    assert response.status_code == 400, response.content
    assert words in str(response.json()["errors"])
    assert footprint(directive) == before


def test_a_running_step_cannot_be_edited(client, directive):
    a = move(step(directive, "A"), "ready", "running")
    before = footprint(directive)
    response = client.patch(step_url(a), {"task_plan": "Too late"}, format="json")
    assert response.status_code == 409
    assert response.json()["detail"] == "a running step cannot be edited"
    assert footprint(directive) == before


# --------------------------------------------------------------------------- remove


def test_removing_a_step_deletes_it_and_logs_it(client, directive):
    c = step(directive, "C")
    response = client.delete(step_url(c))
    assert response.status_code == 204
    assert not Step.objects.filter(pk=c.pk).exists()
    assert DirectiveEvent.objects.filter(directive=directive, event_type="step_removed", subject_id=str(c.pk)).exists()


def test_a_step_others_depend_on_cannot_be_removed(client, directive):
    before = footprint(directive)
    response = client.delete(step_url(step(directive, "A")))
    assert response.status_code == 409
    assert response.json()["detail"] == "step 'A' cannot be removed while other steps depend on it: 'B', 'C'"
    assert footprint(directive) == before


def test_a_running_step_cannot_be_removed(client, directive):
    c = move(step(directive, "C"), "ready", "running")
    before = footprint(directive)
    assert client.delete(step_url(c)).status_code == 409
    assert footprint(directive) == before


# --------------------------------------------------------------------------- actions


def test_retrying_a_failed_step_sends_it_back_to_pending_and_unblocks_its_dependents(client, directive):
    a = move(step(directive, "A"), "ready", "running", "failed")
    for name in ("B", "C"):
        move(step(directive, name), "blocked")
    response = client.post(step_url(a, "retry/"))
    assert response.status_code == 200
    assert response.json()["status"] == "pending"
    assert set(Step.objects.filter(directive=directive).values_list("status", flat=True)) == {"pending"}
    assert DirectiveEvent.objects.filter(step=a, event_type="step_pending").exists()


def test_retrying_a_step_that_has_not_failed_is_a_409(client, directive):
    a = step(directive, "A")
    before = footprint(directive)
    response = client.post(step_url(a, "retry/"))
    assert response.status_code == 409
    assert response.json()["detail"] == "step cannot go from 'pending' to 'pending': only a failed step can be retried"
    assert footprint(directive) == before


def test_skipping_a_pending_step(client, directive):
    c = step(directive, "C")
    response = client.post(step_url(c, "skip/"))
    assert response.status_code == 200
    assert response.json()["status"] == "skipped"
    assert response.json()["finished_at"]
    assert DirectiveEvent.objects.filter(step=c, event_type="step_skipped").exists()


def test_skipping_a_passed_step_is_a_409(client, directive):
    a = move(step(directive, "A"), "ready", "running", "evaluating", "passed")
    before = footprint(directive)
    response = client.post(step_url(a, "skip/"))
    assert response.status_code == 409
    assert response.json()["detail"] == "step cannot go from 'passed' to 'skipped'"
    assert footprint(directive) == before


def test_asking_for_a_new_evaluation_of_an_executed_step(client, directive):
    a = step(directive, "A")
    Step.objects.filter(pk=a.pk).update(execution_task=make_task(directive, step=a, status=Task.Status.DONE))
    a.refresh_from_db()
    move(a, "ready", "running", "evaluating", "passed")
    response = client.post(step_url(a, "evaluate/"))
    assert response.status_code == 200
    assert response.json()["status"] == "evaluating"
    event = DirectiveEvent.objects.filter(step=a, event_type="step_evaluating").latest("id")
    assert event.data["reason"] == "manual evaluation"
    a.refresh_from_db()
    assert (a.monitoring_task.kind, a.monitoring_task.contract.phase) == ("monitoring", "manual")


def test_evaluating_a_step_that_never_ran_is_a_409(client, directive):
    before = footprint(directive)
    response = client.post(step_url(step(directive, "A"), "evaluate/"))
    assert response.status_code == 409
    assert response.json()["detail"] == "step 'A' has not been executed yet, so there is nothing to evaluate"
    assert footprint(directive) == before
